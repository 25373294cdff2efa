"""The dashboard's token, asked of every request, as Jupyter's server asks for its own.

A server bound beyond loopback makes one up (or is given one) and prints it in the URL it
announces, ``http://host:port/?token=...``. The first request brings it in its query; the
answer sets a cookie that the page's later requests (Dash's layout and callbacks, scripts,
downloads) carry: HttpOnly, so that no script reads it, and SameSite=Strict, so that no
other site's page makes the browser send it. Any request with neither gets a 403.

A server bound to loopback also checks each request's ``Host`` header, as Jupyter's does:
a page of another site can point a name of its own at 127.0.0.1 (DNS rebinding) and then
read this server as its own origin; the browser still sends that name, which is refused.
The port is not checked, so that a tunnel from another port (``ssh -L``) still works.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import flask

# Read when --token is not given: a token in the environment stays out of `ps`, which every
# user of the machine can read (lm.train(dashboard=True) passes it this way).
TOKEN_ENV = "LMD4ML_DASHBOARD_TOKEN"
QUERY = "token"
FORBIDDEN = (
    "403 Forbidden: this lmd4ml dashboard asks for its token. Open the URL it printed when it "
    "started (http://HOST:PORT/?token=...).\n"
)
WRONG_HOST = (
    "403 Forbidden: this lmd4ml dashboard serves this machine only, at the address it printed "
    "(127.0.0.1, localhost or [::1]); a request addressed to another name is refused.\n"
)
# A Host header: a name or an IPv4 address, or an IPv6 address in brackets; then a port.
_HOST = re.compile(r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\[\]:]+))(?::[0-9]*)?")
# What secrets.token_urlsafe makes, and what goes into a URL and a cookie as it is.
_TOKEN = re.compile(r"[A-Za-z0-9._~-]{8,256}")


def new_token() -> str:
    """A random token, 256 bits, URL-safe."""
    return secrets.token_urlsafe(32)


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be a dashboard's token, or None if it can.

    Example:
      >>> token_problem("s3cret-token"), token_problem("short")
      (None, 'a token is 8 to 256 letters, digits or ._~- (got 5 characters)')
    """
    if _TOKEN.fullmatch(token):
        return None
    return f"a token is 8 to 256 letters, digits or ._~- (got {len(token)} characters)"


def matches(given: str | None, token: str) -> bool:
    """Whether ``given`` is ``token``, in time independent of where they differ.

    Compared as bytes: ``hmac.compare_digest`` rejects str with non-ASCII characters, which a
    request may send.
    """
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode())


def is_loopback(host: str) -> bool:
    """Whether only this machine reaches ``host``.

    Example:
      >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0")
      (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_host(header: str | None, bound: str) -> bool:
    """Whether a request's ``Host`` header names this machine's loopback: localhost, a
    loopback address or ``bound`` (the address the server is bound to), any port.

    A request without one is let through: every browser sends it, and only a browser
    can be made to send another site's requests here.

    Example:
      >>> [local_host(h, "127.0.0.1") for h in ("localhost:8050", "[::1]:8050", "127.0.0.1")]
      [True, True, True]
      >>> [local_host(h, "127.0.0.1") for h in ("evil.example:8050", "localhost.evil.example")]
      [False, False]
    """
    if header is None:
        return True
    found = _HOST.fullmatch(header)
    if found is None:
        return False
    name = (found["ip6"] or found["name"]).lower().rstrip(".")
    return name == bound.lower() or is_loopback(name)


def require_local_host(server: flask.Flask, bound: str) -> None:
    """Make ``server`` answer 403 to every request whose ``Host`` is not :func:`local_host`."""
    import flask

    def check() -> flask.Response | None:
        if local_host(flask.request.headers.get("Host"), bound):
            return None
        return flask.Response(WRONG_HOST, 403, mimetype="text/plain")

    server.before_request(check)


def cookie_name(port: str) -> str:
    """The cookie that holds the token: one per port, since a browser sends a host's cookies
    to every port of it, and two dashboards on one machine have different tokens."""
    return f"lmd4ml-token-{port}"


def require_token(server: flask.Flask, token: str) -> None:
    """Make ``server`` answer 403 to every request that carries ``token`` neither in its
    cookie nor in its query; one in the query sets the cookie."""
    import flask  # here, not above: the command line reads tokens without the dashboard extra

    def check() -> flask.Response | None:
        name = cookie_name(flask.request.environ.get("SERVER_PORT", ""))
        if matches(flask.request.cookies.get(name), token):
            return None
        if not matches(flask.request.args.get(QUERY), token):
            return flask.Response(FORBIDDEN, 403, mimetype="text/plain")

        @flask.after_this_request
        def remember(response: flask.Response) -> flask.Response:
            response.set_cookie(name, token, httponly=True, samesite="Strict")
            return response

        return None

    server.before_request(check)
