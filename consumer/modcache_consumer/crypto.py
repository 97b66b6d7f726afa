"""Encryption of secret configs at rest (Fernet), shared by the consumer and its workers.

Light on purpose: workers import it to decrypt a secret at the moment a workflow reads it. Several keys,
newest first, allow rotation (``MultiFernet``): new values use the first, old tokens still decrypt.
"""

from __future__ import annotations

from cryptography import fernet

from modcache import errors

KEY_VARIABLE = "MODCACHE_SECRETS_KEY"


class Secrets:
    def __init__(self, keys: list[str]) -> None:
        self._fernet = fernet.MultiFernet([fernet.Fernet(k) for k in keys]) if keys else None

    @property
    def configured(self) -> bool:
        return self._fernet is not None

    def encrypt(self, plaintext: str) -> str:
        return self._require().encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str, *, name: str = "secret") -> str:
        """The plaintext of ``token``; ``name`` (the config key) only labels the error."""
        try:
            return self._require().decrypt(token.encode()).decode()
        except fernet.InvalidToken:
            raise errors.ConfigError(KEY_VARIABLE, f"cannot decrypt config {name!r}: wrong or retired key") from None

    def _require(self) -> fernet.MultiFernet:
        if self._fernet is None:
            raise errors.ConfigError(KEY_VARIABLE, "not set; secret configs need it")
        return self._fernet
