"""TOC names are cleaned exactly as ``posixpath.normpath`` would, whichever path the cleaning takes."""

from __future__ import annotations

import posixpath

from hypothesis import given, settings
from hypothesis import strategies as st

from als.errors import FormatError
from als.formats.tocentries import clean_name

PIECES = ["a", "b", "é", ".", "..", "/", "./", "//", ".wh.", "x" * 200, "\x00"]


def normpath_clean(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=10).map("".join))
def test_a_cleaned_name_is_what_normpath_makes_of_it(name):
    try:
        cleaned = clean_name(name)
    except FormatError:
        assert "\x00" in name or len(name.encode()) > 255
        return
    assert cleaned == normpath_clean(name)


def test_names_as_writers_spell_them():
    assert clean_name("./") == "" and clean_name("") == "" and clean_name("/") == ""
    assert clean_name("./usr/lib/") == "usr/lib"
    assert clean_name("./usr/lib/python3.11/os.py") == "usr/lib/python3.11/os.py"
    assert clean_name("./root/.bashrc") == "root/.bashrc"
    assert clean_name("./a/../../b") == "b"
    assert clean_name("a//b/./c/") == "a/b/c"
