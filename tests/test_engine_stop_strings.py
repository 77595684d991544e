"""Stop strings over streamed pieces: nothing of a stop string is ever emitted, nothing
else is held back longer than needed."""
import pytest

from tp_numa.stop_strings import StopStringFilter


def run(pieces, stops):
    f = StopStringFilter(stops)
    out, emitted_each = [], []
    stopped = False
    for p in pieces:
        text, stopped = f.push(p)
        out.append(text)
        emitted_each.append(text)
        if stopped:
            break
    if not stopped:
        out.append(f.flush())
    return "".join(out), stopped, emitted_each


def test_no_stops_passes_through():
    assert run(["a", "b"], []) == ("ab", False, ["a", "b"])


def test_stop_inside_one_piece():
    assert run(["hello\n\nworld"], ["\n\n"])[:2] == ("hello", True)


def test_stop_split_over_pieces_is_held_back_then_dropped():
    text, stopped, each = run(["def f():", "\n", "\nclass"], ["\n\n"])
    assert (text, stopped) == ("def f():", True)
    assert each == ["def f():", "", ""]


def test_broken_partial_match_is_released():
    text, stopped, each = run(["ab", "<", "|x", "y"], ["<|end|>"])
    assert (text, stopped) == ("ab<|xy", False)
    assert each == ["ab", "", "<|x", "y"]


def test_partial_match_at_end_is_flushed():
    assert run(["abc", "<|en"], ["<|end|>"])[:2] == ("abc<|en", False)


def test_first_completed_of_several_stops_wins():
    assert run(["x END y STOP"], ["STOP", "END"])[:2] == ("x ", True)
    # "b" completes before "abab" does, whatever the pieces
    assert run(["xabab"], ["abab", "b"])[:2] == ("xa", True)
    assert run(["xa", "bab"], ["abab", "b"])[:2] == ("xa", True)


def test_after_stop_nothing_more():
    f = StopStringFilter(["!"])
    assert f.push("a!b") == ("a", True)
    assert f.push("c") == ("", True)
    assert f.flush() == ""


@pytest.mark.parametrize("stops", [["ab"], ["aab"], ["abab", "b"]])
def test_matches_plain_find_on_every_split(stops):
    # Compare with the character-at-a-time answer (the stop string that completes
    # first) for every way to cut the text into three pieces.
    text = "xaababyabx"
    hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in stops) if i >= 0]
    cut = min(hits)[1] if hits else len(text)
    expect = text[:cut]
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            got, stopped, _ = run([text[:i], text[i:j], text[j:]], stops)
            assert got == expect, (i, j)
            assert stopped == (cut < len(text))
