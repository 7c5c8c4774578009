"""Long-term credentials: static users and the TURN REST API shared secret.

REST API usernames are `<unix-expiry>:<id>` and their password is
base64(HMAC-SHA1(secret, username)), as WebRTC applications and coturn use them. Several secrets
may be accepted at once so they can be rotated without a flag day.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str


def rest_password(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def mint_rest_credentials(
    secret: str, *, now: float, ttl: int = 86400, user_id: str = "xdpturn"
) -> Credentials:
    """Credentials valid for `ttl` seconds from `now` (unix time)."""
    username = f"{int(now) + ttl}:{user_id}"
    return Credentials(username, rest_password(secret, username))


def rest_expiry(username: str) -> int | None:
    """The expiry of a REST API username, or None if it is not of that form."""
    head = username.split(":", 1)[0]
    return int(head) if head.isdigit() else None


@dataclass
class Authenticator:
    """Answers "what passwords may this username have, now?"."""

    secrets: Sequence[str] = ()
    users: Mapping[str, str] = field(default_factory=dict)

    def passwords(self, username: str, now: float) -> list[str]:
        """Candidate passwords (one per REST secret, or the static one); empty if the username
        is unknown or its REST expiry has passed."""
        if username in self.users:
            return [self.users[username]]
        expiry = rest_expiry(username)
        if expiry is None or expiry < now:
            return []
        return [rest_password(secret, username) for secret in self.secrets]
