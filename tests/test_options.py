"""Option parsing: kernel overlayfs's names and escapes, FUSE pass-through, one-line refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cowfs.errors import EXIT_USAGE, UserError
from cowfs.options import escape, parse_options, split_escaped


def test_basic() -> None:
    c = parse_options(["lowerdir=/a:/b,upperdir=/u,workdir=/w"])
    assert c.lowerdirs == ("/a", "/b")
    assert (c.upperdir, c.workdir) == ("/u", "/w")
    assert c.writable and not c.read_only


def test_read_only_without_upper() -> None:
    c = parse_options(["lowerdir=/a"])
    assert not c.writable


def test_escaped_colon_and_comma() -> None:
    c = parse_options([r"lowerdir=/a\:b:/c\,d,upperdir=/u,workdir=/w"])
    assert c.lowerdirs == ("/a:b", "/c,d")


def test_later_options_win_and_merge() -> None:
    c = parse_options(["lowerdir=/x", "lowerdir=/a,upperdir=/u,workdir=/w,noatime"])
    assert c.lowerdirs == ("/a",)
    assert "noatime" in c.fuse_options


def test_fuse_passthrough_and_ignored() -> None:
    c = parse_options(["lowerdir=/a,allow_other,suid,dev,ro,defaults,nofail,x-systemd.foo=1"])
    assert {"allow_other", "suid", "dev", "ro"} <= c.fuse_options
    assert c.read_only
    assert "defaults" not in c.fuse_options


@pytest.mark.parametrize(
    ("opts", "fragment"),
    [
        ("upperdir=/u,workdir=/w", "missing lowerdir"),
        ("lowerdir=/a,upperdir=/u", "must be given together"),
        ("lowerdir=/a,workdir=/w", "must be given together"),
        ("lowerdir=/a,bogus", "unknown mount option 'bogus'"),
        ("lowerdir=/a,writeback_cache", "libfuse connection option"),
        ("lowerdir=/a,max_write=4096", "libfuse connection option"),
        ("lowerdir=/a,redirect_dir=on", "redirect_dir=on is not supported"),
        ("lowerdir=/a,metacopy=on", "metacopy=on is not supported"),
        ("lowerdir=/a::/b", "data-only"),
        ("lowerdir=/a:,upperdir=/u,workdir=/w", "empty layer path"),
        ("lowerdir=", "empty"),
        ("lowerdir=/a,max_read=lots", "needs a number"),
        ("lowerdir=/a,volatile", "volatile needs"),
    ],
)
def test_refusals_are_one_line(opts: str, fragment: str) -> None:
    with pytest.raises(UserError) as ei:
        parse_options([opts])
    assert fragment in str(ei.value)
    assert "\n" not in str(ei.value)
    assert ei.value.exit_code == EXIT_USAGE


paths = st.text(alphabet=st.sampled_from("ab:,\\/ x"), min_size=1, max_size=8).filter(
    lambda s: not s.endswith("\\")
)


@given(st.lists(paths, min_size=1, max_size=4))
def test_lowerdir_escaping_round_trips(ps: list[str]) -> None:
    c = parse_options(["lowerdir=" + ":".join(escape(p) for p in ps)])
    assert c.lowerdirs == tuple(ps)


def test_split_escaped() -> None:
    assert split_escaped(r"a\:b:c", ":") == ["a:b", "c"]
    assert split_escaped("a,,b", ",") == ["a", "", "b"]
