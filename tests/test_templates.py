"""Stamp templates per document type: the services on SQLite and PostgreSQL, signing with a
template's options (stamp page, box and QR code checked on the rendered page), the
administrator's pages with the stamp preview, and ``koin templates``."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from contracts import (
    InvalidTemplateData,
    SignedDocument,
    StampTemplate,
    TemplateExists,
    TemplateNotFound,
    create_template,
    create_user,
    deactivate_template,
    get_template,
    list_templates,
    make_engine,
    make_session_factory,
    require_template,
    session_scope,
    sign_options,
    update_template,
)
from contracts.migrate import upgrade
from keys import Role
from signer import MIN_STAMP_SIZE, MM, Installation, SignatureLevel, sign_pdf
from tests.cli_language import assert_english
from tests.conftest import PUBLIC_URL
from web import create_app
from web.cli import cli

KYOKA = "kensetsu-kyoka"
KYOKA_TITLE = "建設業許可通知書"
BOX = (300.0, 100.0, 520.0, 180.0)


# -- services (SQLite and PostgreSQL) -----------------------------------------------------------


def test_create_get_list(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as db:
        made = create_template(db, KYOKA, title=f"  {KYOKA_TITLE} ", page=1, box=BOX, qr=True)
        create_template(db, "nyusatsu-kekka", title="入札結果通知書")
    assert made.title == KYOKA_TITLE and made.active
    assert made.created_at.tzinfo is not None and made.updated_at == made.created_at
    with sessions() as db:
        found = get_template(db, KYOKA)
        assert found is not None
        assert (found.page, found.box, found.qr, found.level, found.certify) == (
            1, BOX, True, "B-T", False,
        )
        default = require_template(db, "nyusatsu-kekka")
        assert (default.page, default.box, default.qr, default.level) == (-1, None, False, "B-T")
        assert [t.name for t in list_templates(db)] == [KYOKA, "nyusatsu-kekka"]
        assert get_template(db, "nothing") is None


def test_names_are_unique_even_after_deactivation(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as db:
        create_template(db, KYOKA, title=KYOKA_TITLE)
    with pytest.raises(TemplateExists) as caught, session_scope(sessions) as db:
        create_template(db, KYOKA, title="別の文書")
    assert "既にあります" in caught.value.message and KYOKA in caught.value.message_en
    with session_scope(sessions) as db:
        gone = deactivate_template(db, KYOKA)
        assert not gone.active
        assert deactivate_template(db, KYOKA).active is False  # idempotent
    with sessions() as db:
        assert list_templates(db) == []
        assert [t.name for t in list_templates(db, include_inactive=True)] == [KYOKA]
        with pytest.raises(TemplateNotFound):
            require_template(db, KYOKA)
    with pytest.raises(TemplateExists), session_scope(sessions) as db:
        create_template(db, KYOKA, title=KYOKA_TITLE)


def test_update_changes_only_what_is_given(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as db:
        create_template(db, KYOKA, title=KYOKA_TITLE, box=BOX, qr=True)
    with session_scope(sessions) as db:
        changed = update_template(db, KYOKA, page=2, level=SignatureLevel.B_LT, certify=True)
        assert (changed.title, changed.page, changed.box, changed.qr) == (KYOKA_TITLE, 2, BOX, True)
        assert (changed.level, changed.certify) == ("B-LT", True)
        assert changed.updated_at >= changed.created_at
    with session_scope(sessions) as db:
        update_template(db, KYOKA, box=None, qr=False)
    with sessions() as db:
        template = require_template(db, KYOKA)
        assert (template.box, template.qr, template.page) == (None, False, 2)
    with pytest.raises(TemplateNotFound), session_scope(sessions) as db:
        update_template(db, "missing", title="x")
    with pytest.raises(InvalidTemplateData), session_scope(sessions) as db:
        update_template(db, KYOKA, title="ok", box=(0, 0, 10, 10))
    with sessions() as db:
        assert require_template(db, KYOKA).title == KYOKA_TITLE  # nothing half-changed


@pytest.mark.parametrize(
    ("field", "kwargs", "words"),
    [
        ("name", {"name": "Kensetsu Kyoka"}, "kensetsu-kyoka"),
        ("name", {"name": "-kyoka"}, "hyphens"),
        ("name", {"name": "k" * 65}, "64"),
        ("title", {"title": "   "}, "1 to 200"),
        ("page", {"page": 0}, "0 is not a page"),
        ("box", {"box": (100, 100, 50, 200)}, "x1 < x2"),
        ("box", {"box": (100, 100, 100 + MIN_STAMP_SIZE[0] - 1, 200)}, "too small"),
        ("box", {"box": (100, 100, 300, 100 + MIN_STAMP_SIZE[1] - 1)}, "too small"),
        ("box", {"box": (-5, 100, 300, 200)}, "from 0 to"),
        ("box", {"box": (float("nan"), 100, 300, 200)}, "four numbers"),
        ("level", {"level": "B-X"}, "B-B, B-T, B-LT, B-LTA"),
    ],
)
def test_bad_values_are_refused_with_a_reason(
    sessions: sessionmaker[Session], field: str, kwargs: dict[str, object], words: str
) -> None:
    arguments: dict[str, object] = {"name": KYOKA, "title": KYOKA_TITLE, **kwargs}
    with pytest.raises(InvalidTemplateData) as caught, session_scope(sessions) as db:
        create_template(db, **arguments)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert words in caught.value.message_en
    assert caught.value.message != caught.value.message_en  # Japanese too
    with sessions() as db:
        assert list_templates(db, include_inactive=True) == []


def test_the_database_refuses_a_disordered_box(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as db:
        create_template(db, KYOKA, title=KYOKA_TITLE, box=BOX)
    with pytest.raises(IntegrityError), session_scope(sessions) as db:
        db.execute(text("UPDATE stamp_templates SET box_x2 = 10"))
    with pytest.raises(IntegrityError), session_scope(sessions) as db:
        db.execute(text("UPDATE stamp_templates SET box_y1 = NULL"))
    with pytest.raises(IntegrityError), session_scope(sessions) as db:
        db.execute(text("UPDATE stamp_templates SET page = 0"))


# -- signing with a template --------------------------------------------------------------------


def _render(pdf: bytes, page: int, folder: Path, dpi: int = 72) -> Image.Image:
    (folder / "in.pdf").write_bytes(pdf)
    subprocess.run(
        ["pdftoppm", "-r", str(dpi), "-f", str(page), "-l", str(page), "-png", "-singlefile",
         str(folder / "in.pdf"), str(folder / "out")],
        check=True,
    )
    with Image.open(folder / "out.png") as image:
        return image.convert("RGB")


def _inked(image: Image.Image, box: tuple[float, float, float, float], scale: float) -> float:
    """Share of non-white pixels inside ``box`` (points) on ``image`` rendered at ``scale``."""
    x1, y1, x2, y2 = box
    crop = image.crop((
        int(x1 * scale) + 2, int(image.height - y2 * scale) + 2,
        int(x2 * scale) - 2, int(image.height - y1 * scale) - 2,
    )).convert("L")
    histogram = crop.histogram()
    return sum(histogram[:200]) / sum(histogram)


def test_sign_options_place_the_stamp_where_the_template_says(
    installation: Installation, permit_pdf: bytes, tmp_path: Path
) -> None:
    template = StampTemplate(
        name=KYOKA, title=KYOKA_TITLE, page=1, qr=True, level="B-T", certify=False
    )
    template.box = (250.0, 60.0, 560.0, 140.0)
    options = sign_options(template, public_url="https://koin.example.jp")
    assert options.verify_base_url == "https://koin.example.jp"
    result = sign_pdf(permit_pdf, installation.signing_context(Role.POSITION), options)
    assert result.data is not None
    assert (result.page, result.box, result.level) == (1, template.box, SignatureLevel.B_T)
    image = _render(result.data, 1, tmp_path, dpi=144)
    assert _inked(image, template.box, 2.0) > 0.05
    assert _inked(image, (250.0, 200.0, 560.0, 280.0), 2.0) == 0  # above the box: blank paper
    decoded = subprocess.run(
        ["zbarimg", "-q", "--raw", str(tmp_path / "out.png")], capture_output=True, text=True
    )
    assert decoded.stdout.strip() == f"https://koin.example.jp/verify/{result.document_id}"


def test_default_template_signs_the_last_page_without_qr(
    installation: Installation, permit_pdf: bytes
) -> None:
    template = StampTemplate(name=KYOKA, title=KYOKA_TITLE, page=-1, qr=False, level="B-B",
                             certify=True)
    options = sign_options(template, public_url=PUBLIC_URL, document_id=None)
    assert options.verify_base_url is None and options.certify
    result = sign_pdf(permit_pdf, installation.signing_context(Role.POSITION), options)
    assert result.page == 2 and result.box is not None
    assert result.box[2] - result.box[0] == 228  # the narrower default box without QR


# -- the administrator's pages ------------------------------------------------------------------

SECRET = "test-secret-key-0123456789abcdef-not-for-production"
PASSWORD = "correct horse battery staple"
ADMIN = "admin@pref.ibaraki.example"
OFFICER = "keiyaku@pref.ibaraki.example"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture
def web_sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path}/koin.db"
    upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    with session_scope(factory) as db:
        create_user(db, ADMIN, ["admin"], password=PASSWORD, display_name="admin")
        create_user(db, OFFICER, ["officer"], password=PASSWORD, display_name="officer")
    yield factory
    engine.dispose()


@pytest.fixture
def app(koin_home: Path, tmp_path: Path, web_sessions: sessionmaker[Session]) -> Flask:
    return create_app({
        "KOIN_HOME": str(koin_home),
        "KOIN_DATABASE_URL": f"sqlite:///{tmp_path}/koin.db",
        "KOIN_PUBLIC_URL": PUBLIC_URL,
        "SECRET_KEY": SECRET,
        "TESTING": True,
    })


def _token(client: FlaskClient, path: str = "/login") -> str:
    found = _CSRF.search(client.get(path).get_data(as_text=True))
    assert found
    return found.group(1)


def _logged_in(app: Flask, email: str) -> FlaskClient:
    client = app.test_client()
    response = client.post(
        "/login", data={"csrf_token": _token(client), "email": email, "password": PASSWORD}
    )
    assert response.status_code == 302
    return client


@pytest.fixture
def admin(app: Flask) -> FlaskClient:
    return _logged_in(app, ADMIN)


def _form(client: FlaskClient, **fields: str) -> dict[str, str]:
    data = {
        "csrf_token": _token(client, "/admin/templates/new"), "name": KYOKA,
        "title": KYOKA_TITLE, "page": "1", "units": "pt", "x1": "", "y1": "", "x2": "",
        "y2": "", "level": "B-T",
    }
    data.update(fields)
    return data


def test_pages_are_for_administrators_only(app: Flask) -> None:
    anonymous = app.test_client()
    response = anonymous.get("/admin/templates")
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    officer = _logged_in(app, OFFICER)
    assert officer.get("/admin/templates").status_code == 403
    assert officer.get("/admin/templates/new").status_code == 403
    assert "nav-templates" not in officer.get("/contracts").get_data(as_text=True)
    token = _token(officer, "/contracts/new")
    assert officer.post("/admin/templates/new", data={"csrf_token": token, "name": KYOKA,
                                                      "title": "x"}).status_code == 403
    assert officer.post("/admin/templates/preview", data={"csrf_token": token}).status_code == 403


def test_create_edit_and_deactivate(
    admin: FlaskClient, web_sessions: sessionmaker[Session]
) -> None:
    assert 'id="nav-templates"' in admin.get("/admin/templates").get_data(as_text=True)
    # a box in millimetres is stored in points
    response = admin.post("/admin/templates/new", data=_form(
        admin, units="mm", x1="100", y1="20", x2="190", y2="50", qr="on",
    ))
    assert response.status_code == 302, response.get_data(as_text=True)
    page = admin.get("/admin/templates").get_data(as_text=True)
    assert KYOKA_TITLE in page and "を作成しました" in page and "283.5" in page
    with web_sessions() as db:
        made = require_template(db, KYOKA)
        assert made.box == pytest.approx((100 * MM, 20 * MM, 190 * MM, 50 * MM))
        assert made.qr and made.page == 1

    form = admin.get(f"/admin/templates/{KYOKA}/edit?units=mm").get_data(as_text=True)
    assert 'value="190"' in form and "readonly" in form
    response = admin.post(f"/admin/templates/{KYOKA}/edit", data=_form(
        admin, name="ignored", title="建設業許可通知書(更新)", page="-1", level="B-LT",
        certify="on",
    ))
    assert response.status_code == 302, response.get_data(as_text=True)
    with web_sessions() as db:
        changed = require_template(db, KYOKA)
        assert (changed.title, changed.page, changed.box, changed.qr) == (
            "建設業許可通知書(更新)", -1, None, False,
        )
        assert (changed.level, changed.certify) == ("B-LT", True)

    duplicate = admin.post("/admin/templates/new", data=_form(admin))
    assert duplicate.status_code == 409 and "既にあります" in duplicate.get_data(as_text=True)
    bad = admin.post("/admin/templates/new", data=_form(admin, name="x2", x1="1", y1="1",
                                                        x2="20", y2="20"))
    assert bad.status_code == 422 and "小さすぎます" in bad.get_data(as_text=True)
    typo = admin.post("/admin/templates/new", data=_form(admin, name="x3", x1="abc"))
    assert typo.status_code == 400 and "4 つとも数値" in typo.get_data(as_text=True)

    token = _token(admin, "/admin/templates")
    assert admin.post(f"/admin/templates/{KYOKA}/deactivate",
                      data={"csrf_token": token}).status_code == 302
    with web_sessions() as db:
        assert not require_template(db, KYOKA, active=False).active
    assert admin.post("/admin/templates/none/deactivate",
                      data={"csrf_token": token}).status_code == 404
    assert admin.get("/admin/templates/none/edit").status_code == 404
    assert admin.post(f"/admin/templates/{KYOKA}/deactivate").status_code == 400  # no CSRF


def _preview_image(html: str) -> Image.Image:
    found = _PNG.search(html)
    assert found, html
    png = base64.b64decode(found.group(1))
    assert png.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB")


def test_preview_shows_the_stamp_in_its_box(
    admin: FlaskClient, web_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    box = (60.0, 150.0, 340.0, 230.0)  # blank paper on the sample: any ink is the stamp
    response = admin.post("/admin/templates/preview", data=_form(
        admin, x1=str(box[0]), y1=str(box[1]), x2=str(box[2]), y2=str(box[3]), qr="on",
    ))
    html = response.get_data(as_text=True)
    assert response.status_code == 200, html
    image = _preview_image(html)
    scale = image.width / 595.28  # A4 sample at the preview's resolution
    assert _inked(image, box, scale) > 0.05
    assert _inked(image, (360.0, 20.0, 560.0, 100.0), scale) == 0  # default corner left blank
    assert "· 県の見本" in html and "ページ 1" in html
    image.save(tmp_path / "preview.png")
    shutil.copy(tmp_path / "preview.png", Path("/tmp/koin-template-preview.png"))
    with web_sessions() as db:
        assert list_templates(db, include_inactive=True) == []  # nothing saved
        assert db.scalar(select(func.count()).select_from(SignedDocument)) == 0


def test_preview_of_an_uploaded_pdf_on_its_last_page(
    admin: FlaskClient, one_page_permit: bytes
) -> None:
    data: dict[str, object] = dict(_form(admin, page="-1"))
    data["sample"] = (io.BytesIO(one_page_permit), "sample.pdf")
    response = admin.post("/admin/templates/preview", data=data,
                          content_type="multipart/form-data")
    html = response.get_data(as_text=True)
    assert response.status_code == 200, html
    image = _preview_image(html)
    scale = image.width / 595.28
    assert _inked(image, (331.28, 34.0, 559.28, 104.0), scale) > 0.05  # the default box
    assert "· 県の見本" not in html


def test_preview_of_a_box_outside_the_page_says_so(admin: FlaskClient) -> None:
    response = admin.post("/admin/templates/preview", data=_form(
        admin, x1="500", y1="800", x2="700", y2="900",
    ))
    html = response.get_data(as_text=True)
    assert response.status_code == 422
    assert "はみ出しています" in html and "0,0,595" in html
    assert "data:image/png" not in html
    english = admin.post("/admin/templates/preview?lang=en", data=_form(
        admin, x1="500", y1="800", x2="700", y2="900",
    ))
    assert "lies outside page 1" in english.get_data(as_text=True)
    no_page = admin.post("/admin/templates/preview", data=_form(admin, page="9"))
    assert no_page.status_code == 422 and "data:image/png" not in no_page.get_data(as_text=True)


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture
def runner(koin_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    monkeypatch.setenv("KOIN_HOME", str(home))
    monkeypatch.delenv("KOIN_DATABASE_URL", raising=False)
    monkeypatch.setenv("KOIN_LANG", "en")
    return CliRunner()


def test_cli_add_and_list(runner: CliRunner) -> None:
    empty = runner.invoke(cli, ["templates", "list"])
    assert empty.exit_code == 0 and empty.output == "There are no stamp templates.\n"
    added = runner.invoke(cli, [
        "templates", "add", KYOKA, "--title", KYOKA_TITLE, "--page", "1",
        "--box", "100,20,190,50", "--units", "mm", "--qr", "--level", "B-LT",
    ])
    assert added.exit_code == 0, added.output
    assert added.output == f"Created the stamp template: {KYOKA} ({KYOKA_TITLE})\n"
    assert_english(added.output, KYOKA_TITLE)
    assert runner.invoke(cli, ["templates", "add", "other", "--title", "その他"]).exit_code == 0
    listed = runner.invoke(cli, ["templates", "list"])
    assert listed.exit_code == 0
    assert_english(listed.output, KYOKA_TITLE, "その他")
    first, second = listed.output.splitlines()
    assert first.startswith(f"{KYOKA}\t{KYOKA_TITLE}\tpage=1\tbox=283.465,56.6929,")
    assert first.endswith("B-LT qr") and second == "other\tその他\tpage=-1\tbox=default\tB-T"
    rows = json.loads(runner.invoke(cli, ["templates", "list", "--json"]).output)
    assert rows[0]["box"] == pytest.approx([100 * MM, 20 * MM, 190 * MM, 50 * MM])

    again = runner.invoke(cli, ["templates", "add", KYOKA, "--title", "x"])
    assert again.exit_code == 1 and "already exists" in again.output
    small = runner.invoke(cli, ["templates", "add", "tiny", "--title", "x", "--box", "0,0,9,9"])
    assert small.exit_code == 1 and "too small" in small.output
    usage = runner.invoke(cli, ["templates", "add", "bad", "--title", "x", "--box", "1,2"])
    assert usage.exit_code == 2


def test_cli_speaks_japanese_by_default(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KOIN_LANG")
    empty = runner.invoke(cli, ["templates", "list"])
    assert empty.exit_code == 0 and empty.output == "印影テンプレートはありません。\n"
    added = runner.invoke(cli, ["templates", "add", KYOKA, "--title", KYOKA_TITLE])
    assert added.exit_code == 0, added.output
    assert added.output == f"印影テンプレートを作成しました: {KYOKA} ({KYOKA_TITLE})\n"
