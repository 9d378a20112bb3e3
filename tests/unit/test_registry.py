"""Handler registration and discovery: every validation has a negative test."""

import sys
from pathlib import Path

import pydantic
import pytest
from conveyor import ConfigurationError, Context, Envelope, Registry, envelope, on, registry


class Order(pydantic.BaseModel):
    order_id: str


def test_decorated_handler_records_its_settings() -> None:
    @on("orders.placed", name="billing.charge", max_attempts=3, timeout=2, concurrency=4)
    async def charge(order: Order, ctx: Context) -> None: ...

    (handler,) = Registry.of(charge).handlers
    assert (handler.name, handler.topic, handler.retry.max_attempts, handler.timeout, handler.concurrency) == (
        "billing.charge",
        "orders.placed",
        3,
        2.0,
        4,
    )
    assert handler.takes_context and handler.is_async


def test_default_name_derives_from_module_and_function() -> None:
    @on("orders.placed")
    def Charge_Order(order: Order) -> None: ...

    expected = __name__.replace("_", "-") + ".charge-order"
    assert Registry.of(Charge_Order).handlers[0].name == expected


@pytest.mark.parametrize("topic", ["Orders", "orders.*", "orders.>", "", ".orders", "orders..placed", "a" * 129])
def test_invalid_topic_is_rejected_naming_the_function(topic: str) -> None:
    with pytest.raises(ConfigurationError, match=r"test_registry\..*bad.*invalid topic"):

        @on(topic, name="ok.name")
        async def bad(order: Order) -> None: ...


@pytest.mark.parametrize("topic", ["Shipments", "shipments.*", "", "a..b"])
def test_invalid_published_topic_is_rejected_naming_the_function(topic: str) -> None:
    with pytest.raises(ConfigurationError, match=r"test_registry\..*bad.*invalid published topic"):

        @on("orders", name="ok.name", publishes=[topic])
        async def bad(order: Order) -> None: ...


def test_publishes_as_one_string_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="publishes takes a list of topics"):

        @on("orders", name="ok.name", publishes="shipments.created")
        async def bad(order: Order) -> None: ...


def test_published_topics_and_payload_types_are_kept_in_order() -> None:
    @on("orders", name="ok.name", publishes={"shipments.created": Order, "audit.logged": None})
    async def good(order: Order) -> None: ...

    assert Registry.of(good).handlers[0].publishes == (("shipments.created", Order), ("audit.logged", None))


def test_invalid_name_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="invalid handler name"):

        @on("orders", name="Billing Charge")
        async def bad(order: Order) -> None: ...


def test_missing_payload_annotation_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="no type annotation"):

        @on("orders", name="x")
        async def bad(order, ctx: Context) -> None: ...  # type: ignore[no-untyped-def]


def test_wrong_parameter_count_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="takes 3 parameters"):

        @on("orders", name="x")
        async def bad(order: Order, ctx: Context, extra: int) -> None: ...


def test_unvalidatable_payload_type_is_rejected() -> None:
    class Opaque:
        pass

    with pytest.raises(ConfigurationError, match="cannot validate payloads"):

        @on("orders", name="x")
        async def bad(order: Opaque) -> None: ...


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"timeout": 0}, "timeout"),
        ({"concurrency": 0}, "concurrency"),
    ],
)
def test_invalid_limits_are_rejected(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):

        @on("orders", name="x", **kwargs)  # type: ignore[arg-type]
        async def bad(order: Order) -> None: ...


def test_duplicate_names_are_rejected_naming_both_functions() -> None:
    @on("orders", name="same.name")
    async def first(order: Order) -> None: ...

    @on("payments", name="same.name")
    async def second(order: Order) -> None: ...

    with pytest.raises(ConfigurationError, match=r"duplicate handler name 'same.name'.*first.*second"):
        Registry.of(first, second)


def test_undecorated_function_is_rejected() -> None:
    def plain(order: Order) -> None: ...

    with pytest.raises(ConfigurationError, match="not decorated with @on, @cron or @every"):
        Registry.of(plain)


@pytest.mark.parametrize(
    ("annotation", "data", "expected"),
    [
        (bytes, b"\x00\x01", b"\x00\x01"),
        (str, b"hello", "hello"),
        (dict, b'{"a": 1}', {"a": 1}),
        (list[int], b"[1, 2]", [1, 2]),
    ],
)
def test_payload_decoders_follow_the_annotation(annotation: object, data: bytes, expected: object) -> None:
    decode = registry.payloads.decoder_for(annotation, "here")
    assert decode(Envelope(id="1", source="s", type="t", data=data)) == expected


def test_envelope_annotation_receives_the_whole_event() -> None:
    event = envelope.create("t", {"a": 1}, source="s")
    assert registry.payloads.decoder_for(Envelope, "here")(event) is event


def write_app(tmp_path: Path, package: str, files: dict[str, str]) -> None:
    root = tmp_path / package
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name, text in files.items():
        (root / name).write_text(text)


def test_discover_walks_packages(tmp_path: Path) -> None:
    write_app(
        tmp_path,
        "app_walk",
        {
            "billing.py": "from conveyor import on\n@on('orders', name='b.one')\nasync def one(x: dict) -> None: ...\n",
            "shipping.py": "from conveyor import on\n@on('paid', name='s.two')\ndef two(x: dict) -> None: ...\n",
        },
    )
    found = registry.discover(["app_walk"], str(tmp_path))
    assert sorted(h.name for h in found.handlers) == ["b.one", "s.two"]


def test_discover_missing_module_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"'no_such_app_mod'.*CONVEYOR_APP"):
        registry.discover(["no_such_app_mod"], str(tmp_path))


def test_discover_module_with_a_bad_handler_names_module_and_function(tmp_path: Path) -> None:
    write_app(
        tmp_path,
        "app_bad",
        {"billing.py": "from conveyor import on\n@on('orders', name='x')\nasync def nope(x) -> None: ...\n"},
    )
    with pytest.raises(ConfigurationError, match=r"app_bad\.billing\.nope"):
        registry.discover(["app_bad"], str(tmp_path))


def test_discover_import_error_in_app_is_reported(tmp_path: Path) -> None:
    write_app(tmp_path, "app_broken", {"billing.py": "import not_a_real_dependency_xyz\n"})
    with pytest.raises(ConfigurationError, match=r"app_broken\.billing.*not_a_real_dependency_xyz"):
        registry.discover(["app_broken"], str(tmp_path))


@pytest.fixture(autouse=True)
def _forget_test_apps() -> None:
    yield
    for name in [m for m in sys.modules if m.startswith("app_")]:
        del sys.modules[name]
