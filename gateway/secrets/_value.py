"""The secret value type: holds a credential and refuses to show it anywhere but where it is injected."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Mapping
from typing import NoReturn

__all__ = ["SecretBundle", "SecretValue"]


class SecretValue:
    """A secret that prints as its name. `reveal()` is the one door out, used only by injectors.

    repr, str, f-strings, logging, exception messages and tracebacks all see `SecretValue('openai/api-key')`; it
    cannot be pickled or copied into a JSON document by accident.
    """

    __slots__ = ("_value", "name")

    def __init__(self, value: str, name: str) -> None:
        self._value = value
        self.name = name

    def reveal(self) -> str:
        return self._value

    def fingerprint(self, key: bytes) -> str:
        """A keyed fingerprint for audit records: proves which value was used without disclosing it."""
        return hmac.new(key, self._value.encode(), hashlib.sha256).hexdigest()[:32]

    def __repr__(self) -> str:
        return f"SecretValue({self.name!r})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretValue):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self.name)

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretValue cannot be serialised")

    def __len__(self) -> int:
        return len(self._value)


class SecretBundle(Mapping[str, SecretValue]):
    """The fields of one secret (a KV entry, a dynamic credential): `{"value": ...}` or `{"username", "password"}`."""

    __slots__ = ("_fields", "lease_id", "name")

    def __init__(self, name: str, fields: Mapping[str, SecretValue], lease_id: str | None = None) -> None:
        self.name = name
        self._fields = dict(fields)
        self.lease_id = lease_id

    def __getitem__(self, key: str) -> SecretValue:
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"SecretBundle({self.name!r}, fields={sorted(self._fields)})"

    def single(self, field: str | None) -> SecretValue:
        """The field an injector that needs one value uses: the named one, the only one, or `value`."""
        if field is not None:
            return self._fields[field]
        if len(self._fields) == 1:
            return next(iter(self._fields.values()))
        return self._fields["value"]
