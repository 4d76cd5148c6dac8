"""The progress display of ``qmpvm snapshot`` and ``qmpvm migrate``, from
MigrationInfo dicts (no engine)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from qmpvm.tools.progress import (
    CLEAR_LINE,
    Display,
    PlainProgress,
    Tracker,
    format_bytes,
    format_ms,
    format_pair,
    format_rate,
    format_seconds,
    fraction,
    local_path,
    local_uri,
    migrate_summary,
    plain_line,
    render_bar,
    snapshot_summary,
)

MiB = 1 << 20


def active(done: int, total: int = 256 * MiB, **ram: object) -> dict[str, object]:
    """A MigrationInfo with ``done`` bytes of ``total`` RAM through."""
    figures: dict[str, object] = {"total": total, "remaining": total - done, "transferred": done}
    figures.update(ram)
    return {"status": "active", "total-time": 100, "ram": figures}


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (int(96.1 * MiB), "96.1 MiB"),
        (3 << 30, "3.0 GiB"),
        (2 << 40, "2.0 TiB"),
    ],
)
def test_bytes_in_binary_units(count: int, text: str) -> None:
    assert format_bytes(count) == text


def test_a_pair_takes_the_unit_of_its_total() -> None:
    assert format_pair(int(96.1 * MiB), 200 * MiB) == "96.1/200.0 MiB"
    assert format_pair(512 * 1024, 2 << 30) == "0.0/2.0 GiB"
    assert format_pair(10, 100) == "10/100 B"


def test_rate_is_qemus_megabits_as_bytes() -> None:
    assert format_rate(8 * 1.048576) == "1.0 MiB/s"
    assert format_rate(2617.245696) == "312.0 MiB/s"


@pytest.mark.parametrize(
    ("ms", "seconds", "short"),
    [
        (45, "0.04 s", "45 ms"),
        (750, "0.75 s", "750 ms"),
        (1200, "1.2 s", "1.2 s"),
        (2000, "2 s", "2 s"),
        (12345, "12.3 s", "12.3 s"),
        (105_000, "105 s", "105 s"),
        (125_000, "2 min 5 s", "2 min 5 s"),
    ],
)
def test_durations(ms: int, seconds: str, short: str) -> None:
    assert format_seconds(ms) == seconds
    assert format_ms(ms) == short


def test_bar_at_zero() -> None:
    line = render_bar("snapshot", active(0))
    assert line == "snapshot  [....................]    0%  0.0/256.0 MiB  remaining 256.0 MiB"


def test_bar_at_half_with_rate() -> None:
    info = active(128 * MiB, mbps=2617.245696)
    assert render_bar("snapshot", info) == (
        "snapshot  [##########..........]   50%  128.0/256.0 MiB  312.0 MiB/s  remaining 128.0 MiB"
    )


def test_bar_rounds_down_and_never_shows_100_before_the_end() -> None:
    almost = active(256 * MiB - 4096)
    assert " 99%" in render_bar("migrate", almost)
    assert "#" * 19 + "." in render_bar("migrate", almost)


def test_bar_at_the_end() -> None:
    info = active(256 * MiB, mbps=100.0) | {"status": "completed"}
    assert render_bar("migrate", info) == (
        "migrate  [####################]  100%  completed  256.0/256.0 MiB  256.0 MiB sent"
    )


def test_completed_is_whole_even_when_zero_pages_were_not_sent() -> None:
    """``transferred`` stays far below ``total`` for a mostly empty guest."""
    info = {"status": "completed", "ram": {"total": 256 * MiB, "remaining": 0,
            "transferred": 3 * MiB}}  # fmt: skip
    assert fraction(info) == 1.0
    assert fraction(info | {"status": "active"}) == 1.0


def test_bar_without_ram_figures_shows_the_status() -> None:
    assert render_bar("snapshot", {"status": "setup"}) == "snapshot  [....................]  setup"
    assert render_bar("snapshot", {}) == "snapshot  [....................]"
    assert fraction({"status": "active", "ram": "?"}) is None
    assert fraction({"status": "active", "ram": {"total": True, "remaining": False}}) is None


def test_fraction_without_total_uses_transferred_and_remaining() -> None:
    info = {"status": "active", "ram": {"transferred": 30 * MiB, "remaining": 90 * MiB}}
    assert fraction(info) == 0.25
    assert render_bar("migrate", info).startswith("migrate  [#####...............]   25%")
    assert "30.0 MiB sent" in render_bar("migrate", info)


def test_later_passes_are_named() -> None:
    info = active(250 * MiB, **{"dirty-sync-count": 3})
    assert render_bar("migrate", info).endswith("remaining 6.0 MiB  pass 3")


def test_plain_line_names_status_percent_and_figures() -> None:
    assert plain_line("snapshot", {"status": "setup"}) == "snapshot: setup"
    assert plain_line("snapshot", active(64 * MiB)) == (
        "snapshot: active  25%  64.0/256.0 MiB  remaining 192.0 MiB"
    )


def test_plain_progress_writes_a_line_per_status_and_per_ten_percent() -> None:
    plain = PlainProgress("snapshot")
    seen = [
        plain.update(info)
        for info in [
            {"status": "setup"},
            {"status": "setup"},
            active(0),
            active(10 * MiB),
            active(26 * MiB),  # 10.2%
            active(30 * MiB),
            active(200 * MiB),  # straight to 78%: one line
            active(204 * MiB),  # 79.7%
            active(256 * MiB) | {"status": "completed"},
            active(256 * MiB) | {"status": "completed"},
        ]
    ]
    lines = [line for line in seen if line is not None]
    assert [" ".join(line.split("  ")[:2]) for line in lines] == [
        "snapshot: setup",
        "snapshot: active 0%",
        "snapshot: active 10%",
        "snapshot: active 78%",
        "snapshot: completed 100%",
    ]
    assert seen[1] is None and seen[-1] is None


def test_plain_progress_starts_counting_again_on_a_new_pass() -> None:
    plain = PlainProgress("migrate")
    assert plain.update(active(250 * MiB, **{"dirty-sync-count": 1})) is not None
    assert plain.update(active(252 * MiB, **{"dirty-sync-count": 1})) is None
    line = plain.update(active(240 * MiB, **{"dirty-sync-count": 2}))
    assert line is not None and "pass 2" in line
    assert plain.update(active(241 * MiB, **{"dirty-sync-count": 2})) is None


def test_tracker_ignores_the_previous_migrations_figures() -> None:
    tracker = Tracker()
    assert not tracker.on_poll({"status": "completed", "ram": {"total": 1, "remaining": 0}})
    assert not tracker.on_poll({})
    assert tracker.view() == {}
    tracker.on_event("setup")
    assert tracker.on_poll(active(1 * MiB))
    assert tracker.view()["status"] == "setup", "the events' order stands"
    tracker.on_event("active")
    tracker.on_event("completed")
    assert tracker.on_poll(active(256 * MiB))  # an answer from before the last event
    assert tracker.view()["status"] == "completed"


def test_tracker_starts_on_a_poll_of_a_running_migration() -> None:
    tracker = Tracker()
    assert tracker.on_poll(active(0))
    assert tracker.view()["status"] == "active"
    fresh = Tracker()
    assert fresh.on_poll({"status": "completed"}, final=True)


def test_display_on_a_terminal_redraws_one_line() -> None:
    out = io.StringIO()
    display = Display("snapshot", out, tty=True, columns=40)
    display.show({"status": "setup"})
    display.show({"status": "setup"})  # unchanged: not drawn again
    display.show(active(128 * MiB))
    display.note("interrupted")
    display.finish()
    text = out.getvalue()
    assert "\n" not in text.split("interrupted")[0]
    draws = text.split(CLEAR_LINE)[1:]
    assert draws[0] == "snapshot  [....................]  setup"
    assert draws[1] == "snapshot  [##########..........]   50%  "[:39]
    assert draws[2] == "interrupted\n" + draws[1] + "\n"
    assert all(len(draw.split("\n")[-1]) < 40 for draw in draws)


def test_display_elsewhere_writes_lines() -> None:
    out = io.StringIO()
    display = Display("migrate", out, tty=False)
    for info in ({"status": "setup"}, active(0), active(1 * MiB), active(128 * MiB)):
        display.show(info)
    display.finish()
    assert out.getvalue().splitlines() == [
        "migrate: setup",
        "migrate: active  0%  0.0/256.0 MiB  remaining 256.0 MiB",
        "migrate: active  50%  128.0/256.0 MiB  remaining 128.0 MiB",
    ]
    assert "\r" not in out.getvalue()


def test_summaries() -> None:
    result = {"dir": "/tmp/snap", "size": int(256.4 * MiB), "total-time": 750, "downtime": 120,
              "transferred": 9 * MiB}  # fmt: skip
    assert snapshot_summary("snap", result) == (
        "snapshot written to /tmp/snap: 256.4 MiB, total 0.75 s, downtime 120 ms"
    )
    moved = {"status": "completed", "total-time": 1200, "downtime": 45,
             "transferred": int(97.3 * MiB)}  # fmt: skip
    assert migrate_summary("unix:/run/b.sock", moved) == (
        "migrated to unix:/run/b.sock: total 1.2 s, downtime 45 ms, 97.3 MiB sent"
    )
    assert migrate_summary("tcp:h:1", {"status": "completed", "downtime": None}) == (
        "migrated to tcp:h:1"
    )
    assert snapshot_summary("snap", {}) == "snapshot written to snap"


def test_the_end_line_names_what_the_stream_carried() -> None:
    info = {"status": "completed", "ram": {"total": 256 * MiB, "remaining": 0,
            "transferred": 3 * MiB, "mbps": 80.0}}  # fmt: skip
    assert (
        plain_line("snapshot", info) == "snapshot: completed  100%  256.0/256.0 MiB  3.0 MiB sent"
    )


def test_a_last_pass_after_the_end_writes_no_second_end_line() -> None:
    plain = PlainProgress("migrate")
    end = {"status": "completed"}
    assert plain.update(active(256 * MiB, **{"dirty-sync-count": 2}) | end) is not None
    assert plain.update(active(256 * MiB, **{"dirty-sync-count": 3}) | end) is None


def test_relative_paths_are_the_clients_over_a_unix_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert local_path("qmp.sock", "snap") == str(tmp_path / "snap")
    assert local_path("qmp.sock", "/abs/snap") == "/abs/snap"
    assert local_path("host:4444", "snap") == "snap"
    assert local_uri("qmp.sock", "unix:b.sock") == f"unix:{tmp_path / 'b.sock'}"
    assert local_uri("qmp.sock", "tcp:host:4444") == "tcp:host:4444"
    assert local_uri("host:4444", "unix:b.sock") == "unix:b.sock"
