"""Stamp resources built once per process and copied into every signed document.

pyHanko's stamp code shapes the text with HarfBuzz and, for every document, parses the 16 MB
CJK font with fontTools, subsets it and compresses the subset, and compresses the seal image
again: about 0.5 s per stamp. Here the same pyHanko code runs once over every character a
stamp can print (the title lines, the labels, digits, the 令和 date characters, the document ID
alphabet); the resulting PDF objects are kept, already compressed, and each document gets a
copy. Layout and shaping stay pyHanko's (:class:`PrebuiltFontEngine` is a
``GlyphAccumulator`` whose glyph table and font objects come ready-made), so a fast stamp looks
exactly like one made the plain way.

A glyph outside the prepared subset (e.g. a title line changed after preparation, or a
ligature HarfBuzz only forms in context) raises :class:`StampNotCovered`; the signer then makes
that stamp the plain way.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uharfbuzz as hb
from PIL import Image
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.font.api import FontEngine
from pyhanko.pdf_utils.font.opentype import GlyphAccumulator, GlyphAccumulatorFactory
from pyhanko.pdf_utils.images import PdfImage, pil_image
from pyhanko.pdf_utils.writer import BasePdfFileWriter, PdfFileWriter

__all__ = [
    "PrebuiltFontFactory",
    "PrebuiltImage",
    "PreparedFont",
    "PreparedImage",
    "StampNotCovered",
]


class StampNotCovered(Exception):
    """The stamp text needs a glyph that the prepared font subset lacks (internal)."""


@dataclass(frozen=True)
class _FontObjects:
    type0: generic.DictionaryObject
    cidfont: generic.DictionaryObject
    descriptor: generic.DictionaryObject
    font_file: generic.StreamObject
    to_unicode: generic.StreamObject


class PreparedFont:
    """A font's HarfBuzz face and a subset covering a set of characters, as ready PDF objects.

    Build with :meth:`build` (parses and subsets the font: ~0.5 s and ~120 MiB for Noto Sans
    CJK), or restore a built one with :meth:`from_json` (a few KiB; what a process reads when
    ``koin init`` prepared it).
    """

    def __init__(
        self,
        hb_font: hb.Font,
        glyphs: dict[int, tuple[int, int]],
        base_ps_name: str,
        units_per_em: int,
        objects: _FontObjects,
    ) -> None:
        #: HarfBuzz font for shaping (immutable, shared by threads)
        self.hb_font = hb_font
        #: glyph ID → (CID, advance width), as ``GlyphAccumulator._get_cid_and_width``
        self.glyphs = glyphs
        self.base_ps_name = base_ps_name
        self.units_per_em = units_per_em
        self._objects = objects

    @classmethod
    def build(
        cls, font_data: bytes, characters: Iterable[str], lines: Iterable[str]
    ) -> PreparedFont:
        """:param characters: every character a stamp may print, each shaped alone.
        :param lines: typical whole lines, shaped as well (contextual glyph choices).
        :raises Exception: fontTools / HarfBuzz errors for an unusable font file.
        """
        scratch = PdfFileWriter(stream_xrefs=False)
        accumulator = GlyphAccumulator(scratch, io.BytesIO(font_data), font_size=10)
        cmap = accumulator.tt.getBestCmap()
        for char in sorted(set(characters)):
            accumulator.shape(char)
            glyph_name = cmap.get(ord(char))
            if glyph_name is not None:
                gid = accumulator.tt.getGlyphID(glyph_name)
                cid, _ = accumulator._get_cid_and_width(gid)
                accumulator._cid_to_unicode.setdefault(cid, char)
        for line in lines:
            accumulator.shape(line)
        glyphs = dict(accumulator._glyphs)
        base_ps_name = str(accumulator.tt["name"].getDebugName(6))
        units_per_em = int(accumulator.units_per_em)
        accumulator.prepare_write()  # subset, compress: the expensive part, once
        type0 = accumulator._font_ref.get_object()
        cidfont = type0["/DescendantFonts"][0]
        descriptor = cidfont["/FontDescriptor"]
        objects = _FontObjects(
            type0=type0,
            cidfont=cidfont,
            descriptor=descriptor,
            font_file=descriptor["/FontFile3"],
            to_unicode=type0["/ToUnicode"],
        )
        hb_font = hb.Font(hb.Face(font_data))
        return cls(hb_font, glyphs, base_ps_name, units_per_em, objects)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (references left out; :meth:`embed` sets them)."""
        objects = self._objects
        skip = frozenset({"/DescendantFonts", "/ToUnicode", "/FontDescriptor", "/FontFile3"})
        return {
            "glyphs": {str(gid): list(value) for gid, value in self.glyphs.items()},
            "base_ps_name": self.base_ps_name,
            "units_per_em": self.units_per_em,
            "type0": _to_json(objects.type0, skip),
            "cidfont": _to_json(objects.cidfont, skip),
            "descriptor": _to_json(objects.descriptor, skip),
            "font_file": _stream_to_json(objects.font_file),
            "to_unicode": _stream_to_json(objects.to_unicode),
        }

    @classmethod
    def from_json(cls, font_file: Path, data: dict[str, Any]) -> PreparedFont:
        """The font prepared from ``font_file``, restored from :meth:`to_json`'s ``data``.

        HarfBuzz maps the font file instead of reading it, so only the pages that shaping
        touches (cmap, metrics, layout tables) count towards the process's memory.

        :raises KeyError, ValueError, TypeError: ``data`` is not from :meth:`to_json`.
        :raises OSError: the font file cannot be read.
        """
        if not font_file.is_file():
            raise FileNotFoundError(font_file)
        hb_font = hb.Font(hb.Face(hb.Blob.from_file_path(str(font_file))))
        objects = _FontObjects(
            type0=_from_json(data["type0"]),
            cidfont=_from_json(data["cidfont"]),
            descriptor=_from_json(data["descriptor"]),
            font_file=_stream_from_json(data["font_file"]),
            to_unicode=_stream_from_json(data["to_unicode"]),
        )
        glyphs = {int(gid): (int(cid), int(width)) for gid, (cid, width) in data["glyphs"].items()}
        return cls(
            hb_font, glyphs, str(data["base_ps_name"]), int(data["units_per_em"]), objects
        )

    def embed(self, writer: BasePdfFileWriter, type0_ref: generic.IndirectObject,
              obj_stream: Any = None) -> None:
        """Add copies of the font objects to ``writer``, the Type0 font at ``type0_ref``
        (the order and object streams of ``GlyphAccumulator.prepare_write``)."""
        objects = self._objects
        descriptor = generic.DictionaryObject(objects.descriptor)
        descriptor_ref = writer.add_object(descriptor, obj_stream=obj_stream)
        descriptor["/FontFile3"] = writer.add_object(_copy_stream(objects.font_file))
        cidfont = generic.DictionaryObject(objects.cidfont)
        cidfont["/FontDescriptor"] = descriptor_ref
        cidfont_ref = writer.add_object(cidfont, obj_stream=obj_stream)
        type0 = generic.DictionaryObject(objects.type0)
        type0["/DescendantFonts"] = generic.ArrayObject([cidfont_ref])
        type0["/ToUnicode"] = writer.add_object(_copy_stream(objects.to_unicode))
        writer.add_object(type0, obj_stream, idnum=type0_ref.idnum)


def _to_json(value: Any, skip: frozenset[str] = frozenset()) -> Any:
    """Plain PDF values (no references) as JSON: names as "/Name", strings as {"s": …}."""
    if isinstance(value, generic.NameObject):
        return str(value)
    if isinstance(value, generic.BooleanObject):
        return {"b": bool(value)}
    if isinstance(value, generic.FloatObject):
        return {"f": str(value)}
    if isinstance(value, int):
        return int(value)
    if isinstance(value, generic.TextStringObject):
        return {"t": str(value)}
    if isinstance(value, generic.ByteStringObject):
        return {"x": bytes(value).hex()}
    if isinstance(value, generic.ArrayObject):
        return [_to_json(v) for v in value]
    if isinstance(value, generic.DictionaryObject):
        return {"d": {k: _to_json(v) for k, v in value.items() if k not in skip}}
    raise TypeError(f"cannot keep {type(value).__name__} in a prepared font")


def _from_json(value: Any) -> Any:
    if isinstance(value, str):
        return generic.NameObject(value)
    if isinstance(value, bool):
        raise TypeError("bare boolean")
    if isinstance(value, int):
        return generic.NumberObject(value)
    if isinstance(value, list):
        return generic.ArrayObject([_from_json(v) for v in value])
    if isinstance(value, dict) and len(value) == 1:
        [(kind, inner)] = value.items()
        if kind == "b":
            return generic.BooleanObject(bool(inner))
        if kind == "f":
            return generic.FloatObject(inner)
        if kind == "t":
            return generic.TextStringObject(inner)
        if kind == "x":
            return generic.ByteStringObject(bytes.fromhex(inner))
        if kind == "d":
            return generic.DictionaryObject(
                {generic.NameObject(k): _from_json(v) for k, v in inner.items()}
            )
    raise ValueError(f"not a prepared PDF value: {value!r}")


def _stream_to_json(stream: generic.StreamObject) -> dict[str, Any]:
    dictionary = {k: v for k, v in stream.items() if k != "/Length"}
    return {
        "dict": _to_json(generic.DictionaryObject(dictionary)),
        "data": stream.encoded_data.hex(),
    }


def _stream_from_json(data: dict[str, Any]) -> generic.StreamObject:
    return generic.StreamObject(_from_json(data["dict"]), encoded_data=bytes.fromhex(data["data"]))


def _copy_stream(stream: generic.StreamObject) -> generic.StreamObject:
    """A new stream object with the same dictionary and the same encoded (compressed) data."""
    copy = generic.StreamObject(generic.DictionaryObject(stream), encoded_data=stream.encoded_data)
    return copy


class _Uncovered:
    """Stands in for the fontTools font in a prebuilt engine: pyHanko only consults it for
    clusters of several glyphs, which the prepared subset does not handle."""

    def __getattr__(self, name: str) -> Any:
        raise StampNotCovered(name)

    def __getitem__(self, key: str) -> Any:
        raise StampNotCovered(key)


class PrebuiltFontEngine(GlyphAccumulator):
    """pyHanko's ``GlyphAccumulator`` over a :class:`PreparedFont`: the same shaping and text
    operators, without parsing or subsetting the font for each document."""

    def __init__(
        self,
        writer: BasePdfFileWriter,
        prepared: PreparedFont,
        font_size: int,
        obj_stream: Any = None,
    ) -> None:
        # GlyphAccumulator.__init__ would parse the whole font; set up what shape() uses.
        FontEngine.__init__(
            self, writer, prepared.base_ps_name, embedded_subset=True, obj_stream=obj_stream,
            font_size=font_size,
        )
        self.prepared = prepared
        self.hb_font = prepared.hb_font
        self.tt = _Uncovered()
        self.units_per_em = prepared.units_per_em
        self.features = None
        self.ot_language_tag = None
        self.ot_script_tag = None
        self.writing_direction = None
        self.bcp47_lang_code = None
        self._glyphs = {}
        self._cid_to_unicode = {}
        self._font_ref = writer.allocate_placeholder()
        self._write_prepared = False

    def _get_cid_and_width(self, glyph_id: int) -> tuple[int, int]:
        try:
            return self.prepared.glyphs[glyph_id]
        except KeyError:
            raise StampNotCovered(f"glyph {glyph_id}") from None

    def prepare_write(self) -> None:
        if not self._write_prepared:
            self.prepared.embed(self.writer, self._font_ref, self.obj_stream)
            self._write_prepared = True


@dataclass(frozen=True)
class PrebuiltFontFactory(GlyphAccumulatorFactory):
    """A font factory handing out :class:`PrebuiltFontEngine` instances."""

    prepared: PreparedFont | None = None

    def create_font_engine(
        self, writer: BasePdfFileWriter, obj_stream: Any = None
    ) -> GlyphAccumulator:
        assert self.prepared is not None
        if obj_stream is None and writer.stream_xrefs and self.create_objstream_if_needed:
            obj_stream = writer.prepare_object_stream()
        return PrebuiltFontEngine(writer, self.prepared, self.font_size, obj_stream)


class PreparedImage:
    """An image encoded once as pyHanko encodes it (image XObject, soft mask if any)."""

    def __init__(self, image: Image.Image) -> None:
        scratch = PdfFileWriter(stream_xrefs=False)
        image_object = pil_image(image, scratch).get_object()
        self.width, self.height = image.width, image.height
        self.image = image
        self._image = image_object
        mask = image_object.get("/SMask")
        self._mask = mask.get_object() if mask is not None else None

    def embed(self, writer: BasePdfFileWriter) -> generic.IndirectObject:
        image = _copy_stream(self._image)
        if self._mask is not None:
            image["/SMask"] = writer.add_object(_copy_stream(self._mask))
        return writer.add_object(image)


class PrebuiltImage(PdfImage):
    """pyHanko's ``PdfImage`` whose XObject is copied from a :class:`PreparedImage`."""

    def __init__(self, prepared: PreparedImage) -> None:
        super().__init__(prepared.image)
        self.prepared = prepared

    @property
    def image_ref(self) -> generic.IndirectObject:
        assert self.writer is not None
        image_ref = self._image_ref
        if image_ref is None or image_ref.get_pdf_handler() is not self.writer:
            self._image_ref = image_ref = self.prepared.embed(self.writer)
        return image_ref
