"""The administrator's pages for stamp templates (印影テンプレート): one per document type.

Every page is for logged-in administrators; anyone else gets 403.

- ``GET /admin/templates``: every template, deactivated ones marked
- ``GET /admin/templates/new``, ``POST …/new``: the form; create, back to the list
- ``GET /admin/templates/<name>``, ``POST …/<name>``: the same form to change a template
- ``POST /admin/templates/<name>/deactivate``: switch it off (its name stays taken)
- ``POST /admin/templates/preview``: the form as typed (not saved) plus an optional sample PDF;
  the form again with the stamp rendered on its page as a PNG, or the placement's refusal

The preview signs a copy of the sample in memory with the position key at B-B (no timestamp,
no QR lookup, nothing written to the database or the audit trail) and renders the stamp's page
with ``pdftoppm``; the signed copy is discarded.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import shutil
import subprocess
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Response

from contracts import (
    InvalidTemplateData,
    StampTemplate,
    TemplateExists,
    TemplateNotFound,
    UserRole,
    create_template,
    deactivate_template,
    list_templates,
    require_template,
    session_scope,
    sign_options,
    update_template,
)
from contracts.templates import Box, checked_box
from keys import KoinError, Role
from signer import MM, SignatureLevel, sign_pdf
from signer.samples import make_permit_pdf

from . import services
from .auth import login_required
from .errors import page_error
from .i18n import localized

__all__ = ["bp", "render_stamp_preview"]

bp = Blueprint("templates_web", __name__, url_prefix="/admin/templates")

#: Resolution of the preview image: A4 is 827 x 1170 px, the stamp text still legible.
PREVIEW_DPI = 100
PREVIEW_TIMEOUT = 60  # seconds for pdftoppm
SAMPLE_PAGES = 2
_UNITS = ("pt", "mm")
_BOX_FIELDS = ("x1", "y1", "x2", "y2")


class _FormInputError(KoinError):
    """The form itself is malformed (before any service is asked)."""



@bp.errorhandler(TemplateNotFound)
def _not_found(exc: TemplateNotFound) -> tuple[str, int]:
    return page_error(404, exc.message, exc.message_en)


# -- the form -----------------------------------------------------------------------------------


def _number_text(value: float) -> str:
    return f"{round(value, 2):g}"


@dataclass
class TemplateForm:
    """The template form as typed, to show again after an error or a preview."""

    name: str = ""
    title: str = ""
    page: str = "-1"
    units: str = "pt"
    x1: str = ""
    y1: str = ""
    x2: str = ""
    y2: str = ""
    qr: bool = False
    level: str = SignatureLevel.B_T.value
    certify: bool = False

    @classmethod
    def of(cls, template: StampTemplate, units: str = "pt") -> TemplateForm:
        units = units if units in _UNITS else "pt"
        factor = MM if units == "mm" else 1.0
        box = template.box
        x1, y1, x2, y2 = (_number_text(v / factor) for v in box) if box else ("",) * 4
        return cls(
            name=template.name, title=template.title, page=str(template.page), units=units,
            x1=x1, y1=y1, x2=x2, y2=y2, qr=template.qr, level=template.level,
            certify=template.certify,
        )

    @classmethod
    def from_request(cls) -> TemplateForm:
        form = request.form
        units = form.get("units", "pt")
        return cls(
            name=form.get("name", "")[:200],
            title=form.get("title", "")[:1000],
            page=form.get("page", "")[:20],
            units=units if units in _UNITS else "pt",
            **{key: form.get(key, "")[:40] for key in _BOX_FIELDS},
            qr=form.get("qr") == "on",
            level=form.get("level", "")[:20],
            certify=form.get("certify") == "on",
        )

    def page_number(self) -> int:
        """:raises _FormInputError: not a whole number (full-width digits are fine)."""
        folded = unicodedata.normalize("NFKC", self.page).strip().replace("−", "-")
        if not re.fullmatch(r"-?\d{1,6}", folded):
            raise _FormInputError(
                "ページは数字で入力してください(-1 で最終ページ)。",
                "Enter the page as a number (-1: the last page).",
                field="page",
            )
        return int(folded)

    def box_points(self) -> Box | None:
        """The box in points, or None when all four fields are empty (the default box).

        :raises _FormInputError: some fields are empty, or not numbers.
        :raises InvalidTemplateData: the numbers are no usable box.
        """
        texts = [
            unicodedata.normalize("NFKC", getattr(self, key)).strip() for key in _BOX_FIELDS
        ]
        if not any(texts):
            return None
        try:
            values = [float(text) for text in texts]
        except ValueError:
            raise _FormInputError(
                "印影の枠は 4 つとも数値で入力してください(すべて空欄なら右下の標準位置)。",
                "Enter all four numbers of the stamp box (leave all empty for the default "
                "bottom-right box).",
                field="box",
            ) from None
        factor = MM if self.units == "mm" else 1.0
        x1, y1, x2, y2 = (value * factor for value in values)
        return checked_box((x1, y1, x2, y2))

    def transient_template(self) -> StampTemplate:
        """A template with these settings that is never added to a session (for the preview).

        :raises _FormInputError, InvalidTemplateData: a value is unusable.
        """
        level = self.level if self.level in {lv.value for lv in SignatureLevel} else "B-T"
        template = StampTemplate(
            name=self.name or "preview", title=self.title or "preview", page=self.page_number(),
            qr=self.qr, level=level, certify=self.certify, active=True,
        )
        template.box = self.box_points()
        return template


def _form_page(
    form: TemplateForm,
    *,
    editing: StampTemplate | None = None,
    error: KoinError | None = None,
    status: int = 200,
    preview: PreviewImage | None = None,
) -> tuple[str, int]:
    text = localized(error.message, error.message_en) if error is not None else None
    return (
        render_template(
            "template_form.html",
            form=form,
            editing=editing,
            error=text,
            preview=preview,
            levels=[level.value for level in SignatureLevel],
        ),
        status,
    )


# -- pages --------------------------------------------------------------------------------------


@bp.get("")
@login_required(UserRole.ADMIN)
def template_list() -> str:
    """Every template by name, active or not."""
    with services.session_factory()() as db:
        templates = list_templates(db, include_inactive=True)
    return render_template("templates.html", templates=templates, mm=MM)


@bp.get("/new")
@login_required(UserRole.ADMIN)
def new_form() -> tuple[str, int]:
    return _form_page(TemplateForm())


@bp.post("/new")
@login_required(UserRole.ADMIN)
def create() -> Response | tuple[str, int]:
    """Create a template and go back to the list.

    :raise 400: the form is malformed (page or box not numbers); shown again as typed.
    :raise 409: the name is taken.
    :raise 422: the service refused a value (name pattern, box too small, …).
    """
    form = TemplateForm.from_request()
    try:
        page, box = form.page_number(), form.box_points()
    except _FormInputError as exc:
        return _form_page(form, error=exc, status=400)
    except InvalidTemplateData as exc:
        return _form_page(form, error=exc, status=422)
    try:
        with session_scope(services.session_factory()) as db:
            template = create_template(
                db, form.name, title=form.title, page=page, box=box, qr=form.qr,
                level=form.level, certify=form.certify,
            )
    except TemplateExists as exc:
        return _form_page(form, error=exc, status=409)
    except InvalidTemplateData as exc:
        return _form_page(form, error=exc, status=422)
    flash(localized(f"印影テンプレート {template.name} を作成しました。",
                    f"Created the stamp template {template.name}."), "template")
    return redirect(url_for(".template_list"))


@bp.get("/<name>/edit")
@login_required(UserRole.ADMIN)
def edit_form(name: str) -> tuple[str, int]:
    """:raise 404: there is no such template."""
    with services.session_factory()() as db:
        template = require_template(db, name, active=False)
    return _form_page(TemplateForm.of(template, request.args.get("units", "pt")),
                      editing=template)


@bp.post("/<name>/edit")
@login_required(UserRole.ADMIN)
def update(name: str) -> Response | tuple[str, int]:
    """Change a template (its name stays).

    :raise 400: the form is malformed; :raise 404: no such template;
    :raise 422: the service refused a value.
    """
    form = TemplateForm.from_request()
    with services.session_factory()() as db:
        editing = require_template(db, name, active=False)
    form.name = editing.name
    try:
        page, box = form.page_number(), form.box_points()
    except _FormInputError as exc:
        return _form_page(form, editing=editing, error=exc, status=400)
    except InvalidTemplateData as exc:
        return _form_page(form, editing=editing, error=exc, status=422)
    try:
        with session_scope(services.session_factory()) as db:
            update_template(
                db, name, title=form.title, page=page, box=box, qr=form.qr, level=form.level,
                certify=form.certify,
            )
    except InvalidTemplateData as exc:
        return _form_page(form, editing=editing, error=exc, status=422)
    flash(localized(f"印影テンプレート {editing.name} を更新しました。",
                    f"Updated the stamp template {editing.name}."), "template")
    return redirect(url_for(".template_list"))


@bp.post("/<name>/deactivate")
@login_required(UserRole.ADMIN)
def deactivate(name: str) -> Response:
    """:raise 404: there is no such template."""
    with session_scope(services.session_factory()) as db:
        template = deactivate_template(db, name)
    flash(localized(f"印影テンプレート {template.name} を無効にしました。",
                    f"Deactivated the stamp template {template.name}."), "template")
    return redirect(url_for(".template_list"))


# -- preview ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreviewImage:
    png: bytes
    page: int
    box: Box
    sample: bool  # the built-in sample rather than an uploaded PDF

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    @property
    def box_text(self) -> str:
        return ", ".join(_number_text(v) for v in self.box)

    @property
    def box_mm_text(self) -> str:
        return ", ".join(_number_text(v / MM) for v in self.box)


def render_stamp_preview(pdf: bytes, template: StampTemplate, *, public_url: str) -> PreviewImage:
    """Sign a copy of ``pdf`` in memory as ``template`` says, but at B-B and without
    certifying, and render the stamp's page as a PNG. Nothing is stored or recorded.

    :raises PlacementError: the page or box do not fit ``pdf``.
    :raises InvalidPdfError: ``pdf`` is not a usable PDF.
    :raises KoinError: the key cannot be used, or pdftoppm is missing or failed.
    """
    options = dataclasses.replace(
        sign_options(template, public_url=public_url), level=SignatureLevel.B_B, certify=False
    )
    context = services.installation().signing_context(Role.POSITION)
    result = sign_pdf(pdf, context, options)
    assert result.data is not None and result.page is not None and result.box is not None
    return PreviewImage(_render_page(result.data, result.page), result.page, result.box, False)


def _render_page(pdf: bytes, page: int) -> bytes:
    """:raises KoinError: pdftoppm is missing or failed."""
    if shutil.which("pdftoppm") is None:
        raise KoinError(
            "PDF を画像にするための pdftoppm(poppler-utils)がありません。",
            "pdftoppm (poppler-utils) is not installed.",
        )
    with tempfile.TemporaryDirectory(prefix="koin-preview-") as folder:
        source = Path(folder) / "preview.pdf"
        source.write_bytes(pdf)
        try:
            subprocess.run(
                ["pdftoppm", "-r", str(PREVIEW_DPI), "-f", str(page), "-l", str(page), "-png",
                 "-singlefile", str(source), str(Path(folder) / "page")],
                check=True, capture_output=True, timeout=PREVIEW_TIMEOUT,
            )
            return (Path(folder) / "page.png").read_bytes()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            raise KoinError(
                "印影の確認用画像を作れませんでした。",
                f"The preview image could not be rendered: {exc.__class__.__name__}",
            ) from exc


@bp.post("/preview")
@login_required(UserRole.ADMIN)
def preview() -> tuple[str, int]:
    """The form again, with the stamp rendered where the typed settings put it, on the
    uploaded sample PDF or on the built-in two-page permit notice.

    :raise 400: the form is malformed; :raise 413: the upload is too large;
    :raise 422: the settings or the PDF were refused (e.g. the box lies outside the page: the
        message gives the page size).
    """
    try:
        form = TemplateForm.from_request()
        upload = request.files.get("sample")
        pdf = upload.read() if upload is not None and upload.filename else None
    except RequestEntityTooLarge:
        limit = int(current_app.config["KOIN_MAX_UPLOAD_BYTES"]) // (1024 * 1024)
        return page_error(
            413,
            f"ファイルが大きすぎます({limit} MB まで)。",
            f"The file is too large ({limit} MB max).",
        )
    editing = None
    if request.form.get("editing"):
        with services.session_factory()() as db:
            editing = require_template(db, request.form["editing"], active=False)
        form.name = editing.name
    try:
        template = form.transient_template()
    except _FormInputError as exc:
        return _form_page(form, editing=editing, error=exc, status=400)
    except InvalidTemplateData as exc:
        return _form_page(form, editing=editing, error=exc, status=422)
    sample = pdf is None
    if pdf is None:
        pdf = make_permit_pdf(services.installation().font_file, pages=SAMPLE_PAGES)
    try:
        public_url = str(current_app.config["KOIN_PUBLIC_URL"])
        image = render_stamp_preview(pdf, template, public_url=public_url)
    except KoinError as exc:
        return _form_page(form, editing=editing, error=exc, status=422)
    return _form_page(form, editing=editing, preview=dataclasses.replace(image, sample=sample))
