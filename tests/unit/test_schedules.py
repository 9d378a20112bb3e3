"""Cron declarations, fire times (day-of-week, seconds, DST) and the misfire planner."""

from datetime import UTC, datetime, timedelta

import pytest
from conveyor import ConfigurationError, Registry
from conveyor.scheduling import schedules, triggers
from conveyor.scheduling.schedules import Fire, cron, every, plan


def declare(expression: str, **options: object) -> schedules.Schedule:
    @cron(expression, name=options.pop("name", "jobs.test"), **options)  # type: ignore[arg-type]
    def job() -> None: ...

    return job.__conveyor_schedule__  # type: ignore[attr-defined, no-any-return]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_weekday_numbers_follow_crontab_where_zero_is_sunday() -> None:
    monday, sunday = declare("0 9 * * 1"), declare("0 9 * * 0", name="jobs.sunday")
    after = utc(2026, 11, 18)  # a Wednesday
    assert monday.next_fires(after, 1) == [utc(2026, 11, 23, 9)]
    assert sunday.next_fires(after, 1) == [utc(2026, 11, 22, 9)]


def test_day_names_and_ranges_translate() -> None:
    assert triggers.translate_day_of_week("1-5") == "mon,tue,wed,thu,fri"
    assert triggers.translate_day_of_week("5-7") == "sun,fri,sat"
    assert triggers.translate_day_of_week("0-6") == "*"


def test_six_fields_start_with_seconds() -> None:
    assert declare("*/20 * * * * *").next_fires(utc(2026, 1, 1), 3) == [
        utc(2026, 1, 1, 0, 0, 20),
        utc(2026, 1, 1, 0, 0, 40),
        utc(2026, 1, 1, 0, 1),
    ]


def test_macros_expand() -> None:
    assert declare("@hourly").next_fires(utc(2026, 1, 1, 0, 30), 1) == [utc(2026, 1, 1, 1)]


@pytest.mark.parametrize(
    ("expression", "options", "message"),
    [
        ("61 * * * *", {}, "invalid cron expression"),
        ("* * * *", {}, "expected 5 fields"),
        ("0 9 * * 8", {}, "out of range"),
        ("0 9 * * *", {"tz": "Mars/Olympus"}, "unknown time zone"),
        ("0 9 * * *", {"name": "Bad Name"}, "invalid schedule name"),
        ("0 9 * * *", {"misfire": "sometimes"}, "misfire must be one of"),
        ("0 9 * * *", {"overlap": "maybe"}, "overlap must be one of"),
        ("0 9 * * *", {"max_catchup": 0}, "max_catchup"),
        ("0 9 * * *", {"jitter": -1}, "jitter"),
    ],
)
def test_invalid_declarations_fail_naming_the_function(
    expression: str, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=rf"test_schedules\.declare\.<locals>\.job.*{message}"):
        declare(expression, **options)


def test_job_with_two_parameters_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="takes \\(ctx\\) or nothing"):

        @cron("* * * * *", name="jobs.two")
        def job(a: object, b: object) -> None: ...


def test_non_positive_interval_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="interval must be positive"):

        @every(timedelta(0), name="jobs.zero")
        def job() -> None: ...


def test_intervals_are_anchored_so_replicas_agree() -> None:
    @every(timedelta(seconds=7), name="jobs.seven")
    def job() -> None: ...

    schedule = job.__conveyor_schedule__  # type: ignore[attr-defined]
    fires_a = schedule.next_fires(utc(2026, 1, 1, 0, 0, 1), 3)
    fires_b = schedule.next_fires(utc(2026, 1, 1, 0, 0, 2, 500000), 3)
    assert fires_a == fires_b
    assert all((f - triggers.EPOCH).total_seconds() % 7 == 0 for f in fires_a)


# -- DST: Europe/Berlin moves 02:00 -> 03:00 on 2026-03-29 and 03:00 -> 02:00 on 2026-10-25 --


def test_daily_0130_berlin_fires_once_on_each_change_day_at_the_local_time() -> None:
    job = declare("30 1 * * *", tz="Europe/Berlin")
    spring = job.next_fires(utc(2026, 3, 28, 12), 2)
    autumn = job.next_fires(utc(2026, 10, 24, 12), 2)
    assert spring == [utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 23, 30)]  # 01:30 CET, then 01:30 CEST
    assert autumn == [utc(2026, 10, 24, 23, 30), utc(2026, 10, 26, 0, 30)]  # 01:30 CEST, then 01:30 CET


def test_skipped_wall_time_fires_once_shifted_forward_by_the_skipped_hour() -> None:
    job = declare("30 2 * * *", tz="Europe/Berlin")
    # 02:30 does not exist on 2026-03-29 (02:00 CET -> 03:00 CEST): it fires at 03:30 CEST = 01:30 UTC
    assert job.next_fires(utc(2026, 3, 28, 12), 2) == [utc(2026, 3, 29, 1, 30), utc(2026, 3, 30, 0, 30)]


def test_repeated_wall_time_fires_at_both_instants() -> None:
    job = declare("30 2 * * *", tz="Europe/Berlin")
    assert job.next_fires(utc(2026, 10, 24, 12), 3) == [
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 25, 1, 30),
        utc(2026, 10, 26, 1, 30),
    ]


# -- misfires --------------------------------------------------------------------------


def every_second(misfire: str, max_catchup: int = 100) -> schedules.Schedule:
    @every(timedelta(seconds=1), name="jobs.tick", misfire=misfire, max_catchup=max_catchup)  # type: ignore[arg-type]
    def job() -> None: ...

    return job.__conveyor_schedule__  # type: ignore[attr-defined, no-any-return]


LAST = utc(2026, 1, 1, 12, 0, 0)
AFTER_FIVE_MISSED = LAST + timedelta(seconds=6, milliseconds=500)  # fires :01..:05 missed, :06 on time


def test_skip_runs_none_of_the_missed_fires() -> None:
    assert plan(every_second("skip"), LAST, AFTER_FIVE_MISSED) == [
        Fire(LAST + timedelta(seconds=5), run=False),
        Fire(LAST + timedelta(seconds=6), run=True),
    ]


def test_coalesce_runs_the_missed_fires_once() -> None:
    assert plan(every_second("coalesce"), LAST, AFTER_FIVE_MISSED) == [
        Fire(LAST + timedelta(seconds=5), run=True),
        Fire(LAST + timedelta(seconds=6), run=True),
    ]


def test_all_runs_every_missed_fire() -> None:
    fires = plan(every_second("all"), LAST, AFTER_FIVE_MISSED)
    assert fires == [Fire(LAST + timedelta(seconds=n), run=True) for n in range(1, 7)]


def test_all_is_bounded_by_max_catchup() -> None:
    fires = plan(every_second("all", max_catchup=3), LAST, LAST + timedelta(hours=2, milliseconds=500))
    assert [f.at for f in fires] == [LAST + timedelta(hours=2, seconds=s) for s in (-3, -2, -1, 0)]


def test_first_start_runs_only_what_is_due_now() -> None:
    now = utc(2026, 1, 1, 12, 0, 0, 300000)
    assert plan(every_second("all"), None, now) == [Fire(utc(2026, 1, 1, 12), run=True)]


def test_nothing_is_planned_twice() -> None:
    schedule = every_second("coalesce")
    now = LAST + timedelta(milliseconds=400)
    assert plan(schedule, LAST, now) == []


def test_duplicate_schedule_names_are_rejected() -> None:
    from conveyor import Registry

    @cron("* * * * *", name="jobs.same")
    def first() -> None: ...

    @every(timedelta(minutes=1), name="jobs.same")
    def second() -> None: ...

    with pytest.raises(ConfigurationError, match=r"duplicate schedule name 'jobs\.same'"):
        Registry.of(first, second)


def test_schedule_invalid_published_topic_is_rejected_naming_the_function() -> None:
    with pytest.raises(ConfigurationError, match=r"schedule .*bad.*invalid published topic"):

        @every(timedelta(minutes=1), name="ok.name", publishes=["Orders.*"])
        def bad() -> None: ...


def test_schedule_published_topics_are_kept() -> None:
    @cron("@hourly", name="ok.name", publishes=["orders.placed"])
    def good() -> None: ...

    assert Registry.of(good).schedules[0].publishes == (("orders.placed", None),)
