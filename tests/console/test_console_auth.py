"""Who may use the console: token, login, CSRF, Origin, read-only, the token-less local rule."""

from __future__ import annotations

import logging

import pytest
from conftest import TOKEN, MakeConsole, client_for, csrf_of
from conveyor import errors
from conveyor.console import auth

PAUSE = "/console/schedules/reports.refresh/pause"


async def _login(client: object, name: str = "ada") -> str:
    """Log in through the form; return the session's CSRF token."""
    page = await client.get("/console/login")  # type: ignore[attr-defined]
    response = await client.post(  # type: ignore[attr-defined]
        "/console/login", data={"csrf": csrf_of(page.text), "token": TOKEN, "name": name, "next": "/console/"}
    )
    assert response.status_code == 303, response.text
    return csrf_of((await client.get("/console/schedules")).text)  # type: ignore[attr-defined]


async def test_console_page_without_login_redirects_to_the_login_form(make_console: MakeConsole) -> None:
    async with client_for(await make_console(token=TOKEN), "http://console.example") as client:
        response = await client.get("/console/sagas")
    assert response.status_code == 303
    assert response.headers["location"].startswith("/console/login?next=")


async def test_console_action_without_credential_is_401_in_the_json_shape(make_console: MakeConsole) -> None:
    async with client_for(await make_console(token=TOKEN), "http://console.example") as client:
        response = await client.post(PAUSE, headers={"accept": "application/json"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


async def test_console_wrong_bearer_token_is_refused(make_console: MakeConsole) -> None:
    async with client_for(await make_console(token=TOKEN), "http://console.example") as client:
        response = await client.post(PAUSE, headers={"authorization": "Bearer wrong-token-wrong-token"})
    assert response.status_code == 401


async def test_console_bearer_token_acts_and_is_audited(
    make_console: MakeConsole, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "conveyor.console")
    async with client_for(await make_console(token=TOKEN), "http://console.example") as client:
        response = await client.post(PAUSE, headers={"authorization": f"Bearer {TOKEN}", "accept": "application/json"})
    assert response.json()["ok"] is True
    assert any("schedules.pause by bearer" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caplog.records)


async def test_console_login_sets_a_strict_httponly_cookie(make_console: MakeConsole) -> None:
    async with client_for(await make_console(token=TOKEN), "http://console.example") as client:
        page = await client.get("/console/login")
        response = await client.post(
            "/console/login", data={"csrf": csrf_of(page.text), "token": TOKEN, "name": "ada", "next": "/console/"}
        )
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie


async def test_console_login_with_wrong_token_is_refused(make_console: MakeConsole) -> None:
    async with client_for(await make_console(token=TOKEN), "http://console.example") as client:
        page = await client.get("/console/login")
        response = await client.post("/console/login", data={"csrf": csrf_of(page.text), "token": "nope", "next": ""})
        assert response.status_code == 401
        assert (await client.get("/console/")).status_code == 303


async def test_console_logged_in_action_without_csrf_token_is_refused(make_console: MakeConsole) -> None:
    async with client_for(await make_console(token=TOKEN), "http://console.example") as client:
        await _login(client)
        response = await client.post(PAUSE, data={"csrf": "forged"})
    assert response.status_code == 403
    assert "form token" in response.text


async def test_console_logged_in_action_with_csrf_token_is_done_and_names_the_operator(
    make_console: MakeConsole, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "conveyor.console")
    async with client_for(await make_console(token=TOKEN), "http://console.example") as client:
        csrf = await _login(client, name="ada")
        response = await client.post(PAUSE, data={"csrf": csrf}, headers={"origin": "http://console.example"})
    assert response.status_code == 303
    assert any("schedules.pause by ada (session)" in r.getMessage() for r in caplog.records)


async def test_console_cross_site_action_is_refused_even_with_the_csrf_token(make_console: MakeConsole) -> None:
    async with client_for(await make_console(token=TOKEN), "http://console.example") as client:
        csrf = await _login(client)
        response = await client.post(PAUSE, data={"csrf": csrf}, headers={"origin": "https://evil.example"})
        fetched = await client.post(PAUSE, data={"csrf": csrf}, headers={"sec-fetch-site": "cross-site"})
    assert (response.status_code, fetched.status_code) == (403, 403)


async def test_console_read_only_refuses_actions_and_hides_them(make_console: MakeConsole) -> None:
    async with client_for(await make_console(token=TOKEN, readonly=True), "http://console.example") as client:
        csrf = await _login(client)
        page = (await client.get("/console/schedules")).text
        response = await client.post(PAUSE, data={"csrf": csrf})
        bearer = await client.post(PAUSE, headers={"authorization": f"Bearer {TOKEN}", "accept": "application/json"})
    assert "Pause</button>" not in page
    assert response.status_code == 403
    assert bearer.json()["error"]["code"] == "read_only"


async def test_console_without_token_refuses_actions_outside_conveyor_run(make_console: MakeConsole) -> None:
    async with client_for(await make_console(local_actions=False)) as client:
        page = await client.get("/console/schedules")
        response = await client.post(PAUSE, data={"csrf": csrf_of(page.text) if "csrf" in page.text else ""})
    assert "Pause</button>" not in page.text
    assert response.status_code == 403


async def test_console_without_token_allows_local_actions_with_the_csrf_token(make_console: MakeConsole) -> None:
    async with client_for(await make_console(local_actions=True)) as client:
        csrf = csrf_of((await client.get("/console/schedules")).text)
        forged = await client.post(PAUSE, data={"csrf": "forged"})
        response = await client.post(PAUSE, data={"csrf": csrf})
    assert (forged.status_code, response.status_code) == (403, 303)


async def test_console_without_token_answers_only_requests_to_localhost(make_console: MakeConsole) -> None:
    async with client_for(await make_console(local_actions=True), "http://rebound.example") as client:
        response = await client.get("/console/")
    assert response.status_code == 403


@pytest.mark.parametrize(
    ("enabled", "token", "host", "embedded", "expected"),
    [
        (None, None, "127.0.0.1", True, auth.Access(None, local_actions=True)),
        (None, None, "127.0.0.1", False, None),
        (None, None, "0.0.0.0", True, None),
        (True, None, "127.0.0.1", False, auth.Access(None, local_actions=False)),
        (True, TOKEN, "0.0.0.0", False, auth.Access(TOKEN)),
        (False, TOKEN, "127.0.0.1", True, None),
    ],
)
def test_console_access_rule(
    enabled: bool | None, token: str | None, host: str, embedded: bool, expected: auth.Access | None
) -> None:
    assert auth.access_for(enabled=enabled, token=token, readonly=False, host=host, embedded=embedded) == expected


def test_console_switched_on_without_token_on_a_public_address_fails_at_start_up() -> None:
    with pytest.raises(errors.ConfigurationError, match="CONVEYOR_CONSOLE_TOKEN"):
        auth.access_for(enabled=True, token=None, readonly=False, host="0.0.0.0", embedded=False)


def test_console_login_next_never_leaves_the_console() -> None:
    from conveyor.console.app import safe_next

    assert [safe_next(v) for v in ("//evil.example/", "https://evil.example", "/console//x", "/console/sagas")] == [
        "/console/", "/console/", "/console/", "/console/sagas",
    ]  # fmt: skip
