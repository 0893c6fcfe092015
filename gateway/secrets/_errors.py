"""Secret errors.

SecretError                     base; messages name the secret, never its value
├── SecretNotFound              the backend has no such secret or field (a policy/config mistake)
└── SecretUnavailable           the backend cannot be reached or refused us, and no valid cached value exists
"""

from __future__ import annotations

__all__ = ["SecretError", "SecretNotFound", "SecretUnavailable"]


class SecretError(Exception):
    pass


class SecretNotFound(SecretError):
    pass


class SecretUnavailable(SecretError):
    pass
