"""The demo (`python -m lowrank_kernels`) at reduced steps: the shape of the DyLoRA paper's Table 2."""

from __future__ import annotations

import pytest

from lowrank_kernels.demo import main


@pytest.fixture(scope="module")
def result():
    return main(["--steps", "200", "--seed", "0", "--device", "cpu"])


def test_demo_table_shape(result, capsys):
    assert result["ranks"] == [1, 2, 4, 8]
    assert [row["b"] for row in result["rows"]] == [1, 2, 4, 8]
    for row in result["rows"]:
        for key in ("lora", "dylora", "svd"):
            assert row[key] == row[key] and 0.0 <= row[key] < 10.0, (row, key)  # finite, not NaN


def test_dylora_beats_truncated_lora_at_small_ranks(result):
    rows = {row["b"]: row for row in result["rows"]}
    for b in (1, 2):
        assert rows[b]["dylora"] < 0.5 * rows[b]["lora"], rows[b]
        assert rows[b]["dylora"] < 0.6 * result["base"], rows[b]  # truncated DyLoRA is still a real adapter


def test_both_beat_no_adapter_at_full_rank(result):
    full = result["rows"][-1]
    assert full["b"] == 8
    assert full["lora"] < 0.1 * result["base"], (full, result["base"])
    assert full["dylora"] < 0.5 * result["base"], (full, result["base"])
    # LoRA was trained at full rank, so there it is the better of the two
    assert full["lora"] < full["dylora"]


def test_dylora_improves_with_rank(result):
    d = [row["dylora"] for row in result["rows"]]
    assert d[-1] < d[0]
    svd = [row["svd"] for row in result["rows"]]
    assert svd == sorted(svd, reverse=True)  # the reference floor falls with b


def test_demo_smaller_rank_and_cli(capsys):
    out = main(["--steps", "20", "--rank", "3", "--seed", "1"])
    assert out["ranks"] == [1, 2, 3]
    text = capsys.readouterr().out
    assert "DyLoRA" in text and "backend" in text
    assert len([ln for ln in text.splitlines() if ln.split() and ln.split()[0] in {"1", "2", "3"}]) == 3


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--rank", "0"]])
def test_demo_bad_args(argv):
    with pytest.raises(SystemExit):
        main(argv)


def test_demo_restores_thread_count():
    import torch

    before = torch.get_num_threads()
    main(["--steps", "1", "--rank", "2"])
    assert torch.get_num_threads() == before
