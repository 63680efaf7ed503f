"""Stamp templates per document type (e.g. 建設業許可通知書): where the stamp goes, whether it
carries the verification QR code, and at which PAdES level the document is signed.

A template is found by its ``name`` (``kensetsu-kyoka``), which batch jobs and the API give;
``title`` is what staff read. Templates are never deleted, only deactivated, so that the name
of one that was used stays taken. :func:`sign_options` turns a template into the
:class:`signer.SignOptions` that :func:`signer.sign_pdf` takes.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
import unicodedata
from dataclasses import replace
from typing import Literal

from sqlalchemy import Boolean, CheckConstraint, Float, String, false, func, select, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column

from signer import MIN_STAMP_SIZE, Placement, SignatureLevel, SignOptions

from ._db import Base, utcnow
from .errors import ContractsError, InvalidTemplateData, TemplateExists, TemplateNotFound

__all__ = [
    "KEEP",
    "MAX_PAGE_SIZE",
    "NAME_MAX_LENGTH",
    "TITLE_MAX_LENGTH",
    "Box",
    "StampTemplate",
    "checked_box",
    "create_template",
    "deactivate_template",
    "get_template",
    "list_templates",
    "require_template",
    "sign_options",
    "update_template",
]

Box = tuple[float, float, float, float]

NAME_MAX_LENGTH = 64
TITLE_MAX_LENGTH = 200
#: Largest page coordinate accepted (PDF's implementation limit: 14,400 pt = 200 in).
MAX_PAGE_SIZE = 14400.0
#: Largest page number accepted either way (1-based; negative counts from the end).
MAX_PAGE_NUMBER = 9999

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
_LEVELS = ", ".join(f"'{level.value}'" for level in SignatureLevel)
_BOX_COLUMNS = ("box_x1", "box_y1", "box_x2", "box_y2")
_BOX_ALL_NULL = " AND ".join(f"{c} IS NULL" for c in _BOX_COLUMNS)
_BOX_ORDERED = " AND ".join(f"{c} IS NOT NULL" for c in _BOX_COLUMNS) + (
    " AND box_x1 < box_x2 AND box_y1 < box_y2"
)


class _Keep(enum.Enum):
    KEEP = "keep"


#: For :func:`update_template`: leave this setting as it is.
KEEP: Literal[_Keep.KEEP] = _Keep.KEEP


class StampTemplate(Base):
    """How documents of one type are signed: stamp page and box, QR code, level."""

    __tablename__ = "stamp_templates"
    __table_args__ = (
        CheckConstraint(f"level IN ({_LEVELS})", name="level"),
        CheckConstraint("page <> 0", name="page"),
        CheckConstraint(f"({_BOX_ALL_NULL}) OR ({_BOX_ORDERED})", name="box"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    #: Machine name, ``[a-z0-9-]``, e.g. ``kensetsu-kyoka``; never reused.
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH), unique=True)
    #: Japanese display name, e.g. ``建設業許可通知書``.
    title: Mapped[str] = mapped_column(String(TITLE_MAX_LENGTH))
    #: 1-based page of the stamp; negative counts from the end (-1 = the last page).
    page: Mapped[int] = mapped_column(default=-1, server_default="-1")
    #: Stamp box in PDF points from the bottom-left corner; all four NULL = the default
    #: bottom-right box.
    box_x1: Mapped[float | None] = mapped_column(Float)
    box_y1: Mapped[float | None] = mapped_column(Float)
    box_x2: Mapped[float | None] = mapped_column(Float)
    box_y2: Mapped[float | None] = mapped_column(Float)
    #: Print the QR code linking to the document's verification page.
    qr: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: PAdES level, a :class:`signer.SignatureLevel` value.
    level: Mapped[str] = mapped_column(
        String(8), default=SignatureLevel.B_T.value, server_default=SignatureLevel.B_T.value
    )
    #: Certification signature (DocMDP: only form filling and further signatures allowed).
    certify: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, server_default=func.now())

    @property
    def box(self) -> Box | None:
        """The stamp box in points, or None for the default bottom-right box."""
        if self.box_x1 is None or self.box_y1 is None or self.box_x2 is None or (
            self.box_y2 is None
        ):
            return None
        return (self.box_x1, self.box_y1, self.box_x2, self.box_y2)

    @box.setter
    def box(self, value: Box | None) -> None:
        self.box_x1, self.box_y1, self.box_x2, self.box_y2 = value or (None, None, None, None)

    @property
    def signature_level(self) -> SignatureLevel:
        return SignatureLevel(self.level)

    def __repr__(self) -> str:
        return f"StampTemplate(name={self.name!r}, page={self.page!r}, box={self.box!r})"


# -- validation -------------------------------------------------------------------------------


def _checked_name(name: str) -> str:
    text = name.strip()
    if not _NAME.fullmatch(text):
        raise InvalidTemplateData(
            "name",
            f"テンプレート名 {text[:80]!r} は使えません(半角の英小文字・数字・ハイフン、"
            f"{NAME_MAX_LENGTH} 文字以内、例: kensetsu-kyoka)。",
            f"The template name {text[:80]!r} cannot be used (lower-case letters, digits and "
            f"hyphens, at most {NAME_MAX_LENGTH} characters, e.g. kensetsu-kyoka).",
        )
    return text


def _checked_title(title: str) -> str:
    text = " ".join(unicodedata.normalize("NFC", title).split())
    if not text or len(text) > TITLE_MAX_LENGTH:
        raise InvalidTemplateData(
            "title",
            f"表示名は 1 文字以上 {TITLE_MAX_LENGTH} 文字以下にしてください。",
            f"The title must have 1 to {TITLE_MAX_LENGTH} characters.",
        )
    return text


def _checked_page(page: int) -> int:
    if isinstance(page, bool) or not isinstance(page, int) or page == 0 or (
        abs(page) > MAX_PAGE_NUMBER
    ):
        raise InvalidTemplateData(
            "page",
            f"ページは 1〜{MAX_PAGE_NUMBER}、または末尾から数える -1〜-{MAX_PAGE_NUMBER} で"
            "指定してください(0 は使えません)。",
            f"The page must be 1 to {MAX_PAGE_NUMBER}, or -1 to -{MAX_PAGE_NUMBER} counting "
            "from the end (0 is not a page).",
        )
    return page


def checked_box(box: Box | None) -> Box | None:
    """``box`` as four floats if it is usable as a stamp box on some page: finite, between 0
    and 14,400 pt, ordered (x1 < x2, y1 < y2) and at least :data:`signer.MIN_STAMP_SIZE`.
    Whether it fits a given document's page is only known when signing.

    :raises InvalidTemplateData: with ``field="box"``.
    """
    if box is None:
        return None
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) and 0 <= v <= MAX_PAGE_SIZE for v in values):
        raise InvalidTemplateData(
            "box",
            f"印影の枠は 0〜{MAX_PAGE_SIZE:g}pt の数値 4 つ(x1,y1,x2,y2)で指定してください。",
            f"The stamp box must be four numbers x1,y1,x2,y2 from 0 to {MAX_PAGE_SIZE:g} pt.",
        )
    x1, y1, x2, y2 = values
    text = f"{x1:g},{y1:g},{x2:g},{y2:g}"
    if not (x1 < x2 and y1 < y2):
        raise InvalidTemplateData(
            "box",
            f"印影の枠 {text} は左下(x1,y1)・右上(x2,y2)の順に、x1 < x2、y1 < y2 と"
            "なるように指定してください。",
            f"The stamp box {text} must be given as lower-left (x1,y1) then upper-right "
            "(x2,y2), with x1 < x2 and y1 < y2.",
        )
    min_w, min_h = MIN_STAMP_SIZE
    if x2 - x1 < min_w or y2 - y1 < min_h:
        raise InvalidTemplateData(
            "box",
            f"印影の枠 {text} は小さすぎます(幅 {min_w:g}pt・高さ {min_h:g}pt 以上に"
            "してください)。",
            f"The stamp box {text} is too small to be legible (at least {min_w:g} x {min_h:g} "
            "pt).",
        )
    return (x1, y1, x2, y2)


def _checked_level(level: SignatureLevel | str) -> SignatureLevel:
    try:
        return SignatureLevel(level)
    except ValueError:
        names = ", ".join(level.value for level in SignatureLevel)
        raise InvalidTemplateData(
            "level",
            f"署名レベル {str(level)[:20]!r} はありません({names} のいずれか)。",
            f"There is no signature level {str(level)[:20]!r} (one of {names}).",
        ) from None


# -- services ---------------------------------------------------------------------------------


def _insert(session: Session) -> postgresql.Insert | sqlite.Insert:
    dialect = session.get_bind(StampTemplate).dialect.name
    if dialect == "postgresql":
        return postgresql.insert(StampTemplate)
    if dialect == "sqlite":
        return sqlite.insert(StampTemplate)
    raise ContractsError(
        f"データベース {dialect} には対応していません。",
        f"The database {dialect} is not supported.",
        backend=dialect,
    )


def create_template(
    session: Session,
    name: str,
    *,
    title: str,
    page: int = -1,
    box: Box | None = None,
    qr: bool = False,
    level: SignatureLevel | str = SignatureLevel.B_T,
    certify: bool = False,
) -> StampTemplate:
    """Create an active stamp template. ``box`` is in points (None = the default box).

    :raises InvalidTemplateData: a value is unusable (the message says which).
    :raises TemplateExists: the name is taken, also by a deactivated template; a concurrent
        creation of the same name loses with this error, not with a database error.
    """
    values = {
        "name": _checked_name(name),
        "title": _checked_title(title),
        "page": _checked_page(page),
        "qr": bool(qr),
        "level": _checked_level(level).value,
        "certify": bool(certify),
        "active": True,
    }
    x1, y1, x2, y2 = checked_box(box) or (None, None, None, None)
    now = utcnow()
    statement = (
        _insert(session)
        .values(
            **values, box_x1=x1, box_y1=y1, box_x2=x2, box_y2=y2, created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=[StampTemplate.name])
        .returning(StampTemplate.id)
    )
    template_id = session.scalars(statement).one_or_none()
    if template_id is None:
        raise TemplateExists(str(values["name"]))
    return session.get_one(StampTemplate, template_id)


def get_template(session: Session, name: str) -> StampTemplate | None:
    """The template called ``name`` (active or not), or None."""
    return session.scalar(select(StampTemplate).where(StampTemplate.name == name.strip()))


def require_template(session: Session, name: str, *, active: bool = True) -> StampTemplate:
    """The template called ``name``; with ``active`` (the default) only an active one.

    :raises TemplateNotFound: there is none (or it is deactivated).
    """
    template = get_template(session, name)
    if template is None or (active and not template.active):
        raise TemplateNotFound(name.strip()[:NAME_MAX_LENGTH + 16])
    return template


def list_templates(session: Session, *, include_inactive: bool = False) -> list[StampTemplate]:
    """The templates by name; only the active ones unless ``include_inactive``."""
    query = select(StampTemplate).order_by(StampTemplate.name)
    if not include_inactive:
        query = query.where(StampTemplate.active.is_(True))
    return list(session.scalars(query))


def update_template(
    session: Session,
    name: str,
    *,
    title: str | Literal[_Keep.KEEP] = KEEP,
    page: int | Literal[_Keep.KEEP] = KEEP,
    box: Box | None | Literal[_Keep.KEEP] = KEEP,
    qr: bool | Literal[_Keep.KEEP] = KEEP,
    level: SignatureLevel | str | Literal[_Keep.KEEP] = KEEP,
    certify: bool | Literal[_Keep.KEEP] = KEEP,
    active: bool | Literal[_Keep.KEEP] = KEEP,
) -> StampTemplate:
    """Change the given settings of the template ``name`` (deactivated ones too, so that
    ``active=True`` re-activates); :data:`KEEP` leaves a setting as it is. The name never
    changes. Everything is checked before anything is changed.

    :raises TemplateNotFound: there is no such template.
    :raises InvalidTemplateData: a value is unusable.
    """
    template = require_template(session, name, active=False)
    new_title = template.title if title is KEEP else _checked_title(title)
    new_page = template.page if page is KEEP else _checked_page(page)
    new_box = template.box if box is KEEP else checked_box(box)
    new_level = template.level if level is KEEP else _checked_level(level).value
    template.title = new_title
    template.page = new_page
    template.box = new_box
    template.level = new_level
    if qr is not KEEP:
        template.qr = bool(qr)
    if certify is not KEEP:
        template.certify = bool(certify)
    if active is not KEEP:
        template.active = bool(active)
    template.updated_at = utcnow()
    session.flush()
    return template


def deactivate_template(session: Session, name: str) -> StampTemplate:
    """Switch the template off: it is no longer listed or used, its name stays taken.
    Idempotent.

    :raises TemplateNotFound: there is no such template.
    """
    template = require_template(session, name, active=False)
    if template.active:
        template.active = False
        template.updated_at = utcnow()
        session.flush()
    return template


def sign_options(
    template: StampTemplate, *, public_url: str, document_id: str | None = None
) -> SignOptions:
    """The signing options of ``template``: its level, certification, stamp page and box, and
    with ``qr`` the verification URL base ``public_url`` for the QR code."""
    return SignOptions(
        level=SignatureLevel(template.level),
        placement=Placement(page=template.page, box=template.box),
        certify=template.certify,
        document_id=document_id,
        verify_base_url=public_url if template.qr else None,
    )


def template_options(
    session: Session, name: str | None, *, public_url: str | None, active: bool = True
) -> SignOptions:
    """The signing options of the stamp template ``name``, or of the standard stamp (bottom
    right, with the verification QR code when ``public_url`` is given) when None. Without a
    ``public_url`` no QR code is printed.

    :param active: refuse a deactivated template (a batch made before keeps its template).
    :raises TemplateNotFound: ``name`` does not name a (an active) template.
    """
    if name is None:
        return SignOptions(verify_base_url=public_url or None)
    options = sign_options(require_template(session, name, active=active),
                           public_url=public_url or "")
    return options if public_url else replace(options, verify_base_url=None)
