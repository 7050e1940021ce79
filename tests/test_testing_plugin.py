"""The pytest plugin (shmreg.testing): fixtures in a fake project run by pytester,
and wait_for directly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import shmreg
from shmreg.testing import WaitTimeout, unique_table_name, wait_for

pytest_plugins = ["pytester"]

INI = """
[pytest]
addopts = -p no:cacheprovider -p no:benchmark -p no:hypothesispytest
filterwarnings = error
"""

# A fake project's tests.  Each test records the tables it got (name and
# path) in tables.txt so the outer test can check they are all gone.
FAKE_TESTS = '''
import os
import subprocess
import sys

import pytest

from shmreg.testing import wait_for


def record(*tables):
    with open("tables.txt", "a") as f:
        for t in tables:
            f.write(f"{t.name} {t.path}\\n")


def test_table_is_fresh_and_usable(shm_table):
    record(shm_table)
    assert len(shm_table) == 0
    shm_table["a"] = 1
    assert shm_table.update_counter("a", 2) == 3
    assert os.path.exists(shm_table.path)


def test_fails_with_a_table(shm_table):
    record(shm_table)
    shm_table["x"] = 1
    assert shm_table["x"] == 2, "failing on purpose"


def test_raises_with_a_table(shm_table):
    record(shm_table)
    raise RuntimeError("erroring on purpose")


@pytest.mark.parametrize("shm_table", [{"capacity": 100, "memory": 1 << 20}], indirect=True)
def test_indirect_options(shm_table):
    record(shm_table)
    assert shm_table.capacity == 100
    assert shm_table.memory == 1 << 20


def test_factory(shm_table_factory):
    a = shm_table_factory()
    b = shm_table_factory(capacity=50)
    record(a, b)
    assert a.name != b.name
    assert b.capacity == 50
    b.unlink()   # a test may unlink its own table: teardown must not mind


def test_wait_for_another_process(shm_table):
    record(shm_table)
    child = subprocess.Popen([sys.executable, "-c",
                              "import shmreg, sys; shmreg.Table.open(sys.argv[1])['ready'] = 'yes'",
                              shm_table.name])
    try:
        assert wait_for(lambda: shm_table.get("ready"), timeout=30, message="child ready") == "yes"
    finally:
        assert child.wait(timeout=30) == 0


def test_wait_for_times_out(shm_table):
    record(shm_table)
    wait_for(lambda: shm_table.get("never"), timeout=0.1, message="the never key")
'''


@pytest.fixture
def segment_dir(monkeypatch):
    """A private SHMREG_DIR for the fake project: whatever it leaves behind is visible."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = tempfile.mkdtemp(prefix="shmreg-plugin-test-", dir=base)
    monkeypatch.setenv("SHMREG_DIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_fixtures_in_a_project_that_uses_them(pytester, segment_dir):
    pytester.makeini(INI)
    pytester.makepyfile(test_fake=FAKE_TESTS)
    # A subprocess: the plugin is found through its pytest11 entry point, as
    # in any project that installed shmreg.
    result = pytester.runpytest_subprocess("-v", timeout=120)
    result.assert_outcomes(passed=4, failed=3)
    out = result.stdout.str()
    for name, outcome in [("test_table_is_fresh_and_usable", "PASSED"),
                          ("test_fails_with_a_table", "FAILED"),
                          ("test_raises_with_a_table", "FAILED"),
                          ("test_indirect_options[shm_table0]", "PASSED"),
                          ("test_factory", "PASSED"),
                          ("test_wait_for_another_process", "PASSED"),
                          ("test_wait_for_times_out", "FAILED")]:
        assert f"{name} {outcome}" in out, (name, outcome, out)
    result.stdout.fnmatch_lines([      # in report order
        "*AssertionError: failing on purpose*",
        "*RuntimeError: erroring on purpose*",
        "*WaitTimeout: timed out after 0.1 s waiting for the never key (last value: None)*",
    ])
    assert "ERROR" not in out  # no teardown errors, failing tests included

    tables = [line.split() for line in (pytester.path / "tables.txt").read_text().splitlines()]
    assert len(tables) == 8
    assert len({name for name, _ in tables}) == 8   # every table unique
    for name, path in tables:
        assert os.path.dirname(path) == segment_dir
        assert not os.path.exists(path), f"{name} left behind"
        with pytest.raises(shmreg.TableNotFoundError):
            shmreg.Table.open(name)
    assert os.listdir(segment_dir) == []


def test_harmless_in_a_project_that_does_not_use_it(pytester, segment_dir):
    pytester.makeini(INI)
    pytester.makepyfile(test_plain="def test_plain():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest_subprocess("-W", "error", timeout=120)
    result.assert_outcomes(passed=1)
    assert result.ret == 0
    assert os.listdir(segment_dir) == []    # nothing created
    # Loaded (its fixtures are offered), and can be switched off by name.
    fixtures = pytester.runpytest_subprocess("--fixtures", timeout=120)
    fixtures.stdout.re_match_lines([r"^shm_table -- .*shmreg/testing\.py"])
    fixtures.stdout.re_match_lines([r"^shm_table_factory -- .*shmreg/testing\.py"])


def test_plugin_can_be_disabled(pytester, segment_dir):
    pytester.makeini(INI)
    pytester.makepyfile(test_uses="def test_uses(shm_table):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:shmreg", timeout=120)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'shm_table' not found*"])
    assert os.listdir(segment_dir) == []


def test_indirect_param_must_be_a_dict(pytester, segment_dir):
    pytester.makeini(INI)
    pytester.makepyfile(test_bad="""
        import pytest
        @pytest.mark.parametrize("shm_table", [100], indirect=True)
        def test_bad(shm_table):
            pass
    """)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*TypeError: shm_table is parametrized with a dict*"])
    assert os.listdir(segment_dir) == []


# -- fixtures in this very suite (the plugin is installed, so they are here too) ----------


def test_shm_table_fixture_here(shm_table):
    assert isinstance(shm_table, shmreg.Table)
    assert shm_table.name in shmreg.list_tables()
    shm_table["k"] = "v"
    assert shmreg.Table.open(shm_table.name)["k"] == "v"


def test_unique_table_names():
    names = {unique_table_name() for _ in range(1000)}
    assert len(names) == 1000
    assert all(len(n) <= 31 for n in names)   # macOS shm_open limit


# -- wait_for -----------------------------------------------------------------------


def test_wait_for_returns_the_truthy_value():
    calls = []

    def cond():
        calls.append(1)
        return len(calls) >= 3 and {"n": len(calls)}

    assert wait_for(cond, timeout=5, interval=0.001) == {"n": 3}
    assert len(calls) == 3


def test_wait_for_returns_at_once_when_already_true():
    calls = []
    assert wait_for(lambda: calls.append(1) or "yes", timeout=0) == "yes"
    assert calls == [1]


def test_wait_for_timeout_message_and_types():
    def never():
        return 0

    with pytest.raises(WaitTimeout) as info:
        wait_for(never, timeout=0.05, interval=0.01, message="the flag")
    err = info.value
    assert isinstance(err, AssertionError) and isinstance(err, TimeoutError)
    assert str(err) == "timed out after 0.05 s waiting for the flag (last value: 0)"
    # Without a message, the condition is named.
    with pytest.raises(AssertionError, match=r"waiting for condition .*never \(last value: 0\)"):
        wait_for(never, timeout=0.02)


def test_wait_for_checks_once_more_at_the_deadline():
    # The condition becomes true only after the deadline has passed while
    # wait_for sleeps: the final check must see it.
    deadline = time.monotonic() + 0.05
    assert wait_for(lambda: time.monotonic() >= deadline, timeout=0.05, interval=10) is True


def test_wait_for_with_zero_timeout_checks_once():
    calls = []
    with pytest.raises(WaitTimeout, match="checked once"):
        wait_for(lambda: calls.append(1), timeout=0)
    assert calls == [1]


def test_wait_for_propagates_condition_errors():
    def broken():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        wait_for(broken, timeout=5)


def test_wait_for_rejects_bad_arguments():
    with pytest.raises(TypeError):
        wait_for(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        wait_for(lambda: 1, timeout=-1)
    with pytest.raises(ValueError):
        wait_for(lambda: 1, interval=0)


def test_wait_for_sees_another_process(shm_table):
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, shmreg
        t = shmreg.Table.open(sys.argv[1])
        for i in range(1, 51):
            t["progress"] = i
    """), shm_table.name])
    try:
        assert wait_for(lambda: shm_table.get("progress") == 50, timeout=30, message="progress 50")
    finally:
        assert child.wait(timeout=30) == 0
