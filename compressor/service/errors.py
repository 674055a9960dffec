"""Typed errors of the service, each with the HTTP status it maps to."""

from __future__ import annotations

from compressor.errors import CompressorError


class ServiceError(CompressorError):
    status = 400


class Unauthorized(ServiceError):
    status = 401


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class TooLarge(ServiceError):
    status = 413


class BadUpload(ServiceError):
    status = 422


class BadOptions(ServiceError):
    """Every bad field of a job's options, one line each in ``errors``."""

    status = 422

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


class InsufficientStorage(ServiceError):
    status = 507


class Forbidden(ServiceError):
    status = 403
