import pytest
import torch

from pgsvd_rt import data


class CharTokenizer:
    """One token per character: enough to test windowing without a real vocabulary."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_calibration_and_heldout_are_disjoint_and_deterministic():
    calib, held = data.wiki_split("calib"), data.wiki_split("heldout")
    assert calib and held
    assert not set(calib) & set(held)
    assert data.wiki_split("calib")[:3] == calib[:3]


def test_calibration_ids_shape_and_determinism():
    tok = CharTokenizer()
    a = data.calibration_ids(tok, 3, 50)
    b = data.calibration_ids(tok, 3, 50)
    assert a.shape == (3, 50) and torch.equal(a, b)


def test_calibration_too_long():
    with pytest.raises(ValueError, match="calibration needs"):
        data.calibration_ids(CharTokenizer(), 10_000, 10_000)


def test_text_file_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        data.read_text_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\r\n")
    with pytest.raises(ValueError, match="is empty"):
        data.read_text_file(empty)


def test_text_file_strips_carriage_returns(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"ab\r\ncd\r\n")
    ids, source = data.eval_ids(CharTokenizer(), f)
    assert ids.tolist() == [ord(c) for c in "ab\ncd\n"] and "t.txt" in source


def test_bad_split():
    with pytest.raises(ValueError, match="unknown wiki split"):
        data.wiki_split("train")
