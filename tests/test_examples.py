"""The examples run end to end at their ``--tiny`` sizes and show what they claim."""

from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_dylora_finetune(examples_on_path, capsys):
    import dylora_finetune

    results = dylora_finetune.main(["--tiny"])
    lora, dylora = results["LoRA"], results["DyLoRA"]
    # DyLoRA's Table 2 in miniature: truncated, the LoRA adapter is far worse than the DyLoRA one ...
    assert dylora[1] < 0.5 * lora[1] and dylora[2] < 0.5 * lora[2]
    # ... and DyLoRA improves with every rank it is given
    assert all(dylora[a] > dylora[b] for a, b in zip([1, 2, 4], [2, 4, 8], strict=True))
    assert "| DyLoRA |" in capsys.readouterr().out


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_convert_peft_adapter(examples_on_path, dora):
    import convert_peft_adapter

    result = convert_peft_adapter.main(["--tiny", *(["--dora"] if dora else [])])
    assert result["max_diff"] < 1e-5 and result["max_diff_back"] < 1e-5


def test_serve_mixed_batch(examples_on_path):
    import serve_mixed_batch

    assert serve_mixed_batch.main(["--tiny"])["max_diff"] < 1e-5


def test_multi_job_finetune(examples_on_path):
    import multi_job_finetune

    result = multi_job_finetune.main(["--tiny"])
    assert all(result["after"][job] < result["before"][job] for job in result["before"])  # every job learned
    assert result["peft_max_diff"] < 1e-5 and result["serve_max_diff"] < 1e-5


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_trainer_finetune(examples_on_path, dora):
    import trainer_finetune

    result = trainer_finetune.main(["--tiny", *(["--dora"] if dora else [])])
    assert result["max_rel_diff"] < 1e-3  # float32: the patched run follows peft's loss curve
    assert result["losses"][-1] < result["losses"][0] and "0 on peft's forward" in result["report"]
