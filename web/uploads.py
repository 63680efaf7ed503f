"""Reading an uploaded PDF from a request: multipart ``file`` or a raw ``application/pdf`` body."""

from __future__ import annotations

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from signer import VerifyInputError

__all__ = ["uploaded_pdf"]


def uploaded_pdf() -> tuple[bytes, str | None]:
    """The uploaded bytes and the client's file name.

    :raises VerifyInputError: nothing was uploaded, or in an unsupported way (400 / 415).
    :raises werkzeug.exceptions.RequestEntityTooLarge: larger than ``MAX_CONTENT_LENGTH``.
    """
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if limit is not None and (request.content_length or 0) > limit:
        # refuse on the announced length, before anything of the body is read or spooled
        raise RequestEntityTooLarge()
    if request.mimetype == "application/pdf":
        return request.get_data(cache=False), None
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            raise VerifyInputError(
                "ファイルが選択されていません。", "No file was uploaded.", reason="no_file",
                status=400,
            )
        return upload.read(), upload.filename
    raise VerifyInputError(
        "PDF を application/pdf または multipart/form-data(file)で送ってください。",
        "Send the PDF as application/pdf or as multipart/form-data field 'file'.",
        reason="unsupported_media_type",
        status=415,
    )
