"""Many distinct one-page permits for tests (see :func:`signer.samples.numbered_copies`)."""

from signer.samples import numbered_copies

__all__ = ["numbered_copies"]
