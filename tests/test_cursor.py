"""The one stream cursor (producers/cursor.py) on a small stream of its own: resume, epochs,
layout checks, and the one policy for unreadable items."""

from __future__ import annotations

import pytest

from online_stablerep.producers.cursor import EpochStream, SkipBad, Unreadable


class Letters(EpochStream[str]):
    """Share `shard` of `num_shards` of the letters of `text`; "?" cannot be read."""

    def __init__(self, text: str, shard: int = 0, num_shards: int = 1, max_epochs: int = 0,
                 skip: bool = False) -> None:
        super().__init__("letters", {"length": len(text), "num_shards": num_shards},
                         "the same text", max_epochs, SkipBad("letters.skip", skip, "test"))
        self.mine = text[shard::num_shards]

    def _epoch(self, epoch, start):
        for position in range(start[0], len(self.mine)):
            letter = self.mine[position]
            item = Unreadable(ValueError(f"letter {position}")) if letter == "?" else f"{epoch}{letter}"
            yield (position + 1,), item


def test_epochs_wrap_and_end_after_max_epochs():
    stream = Letters("abc", max_epochs=2)
    assert stream.take(4) == ["0a", "0b", "0c", "1a"]
    assert stream.take(9) == ["1b", "1c"] and stream.exhausted


def test_a_resumed_cursor_continues_the_same_stream():
    whole = Letters("abcde", shard=1, num_shards=2)
    first = whole.take(3)
    state = whole.state_dict()
    assert state == {"epoch": 1, "position": 1, "length": 5, "num_shards": 2}
    resumed = Letters("abcde", shard=1, num_shards=2)
    resumed.load_state_dict(state)
    assert first == ["0b", "0d", "1b"] and resumed.take(3) == whole.take(3)


def test_a_cursor_of_another_layout_is_refused():
    state = Letters("abc").state_dict()
    with pytest.raises(ValueError, match="saved with length=3, this run has length=4: resume "
                                         "needs the same text"):
        Letters("abcd").load_state_dict(state)


def test_unreadable_items_raise_or_are_counted_and_logged(capsys):
    with pytest.raises(ValueError, match="letter 1"):
        Letters("a?b").take(2)
    stream = Letters("a?b", skip=True)
    assert stream.take(4) == ["0a", "0b", "1a", "1b"] and stream.skipped == 2
    assert "skipped (1 so far, letters.skip=true): letter 1" in capsys.readouterr().out
    # The cursor counts a skipped item as consumed: a resume does not meet it again.
    assert stream.state_dict()["position"] == 3


def test_a_whole_epoch_without_a_good_item_raises_instead_of_looping():
    with pytest.raises(ValueError, match="gave no item"):
        Letters("??", skip=True).take(1)
