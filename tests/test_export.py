"""python -m deal_train.export --merge: the merged standalone model (stock transformers, no PEFT) gives the adapter
model's logits, for a decoder-only and an encoder-decoder run; bad input exits with code 2."""

from __future__ import annotations

import pathlib

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from deal_train.train import loop
from deal_train.data import collate_train, encoder_for
from deal_train.tools.export import main
from deal_train.model.loading import load_model


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_merged_model_gives_the_adapter_models_logits(kind, finished_run, finished_t5_run, tokenizer, tmp_path,
                                                      capsys):
    cfg, _metrics, _ = (finished_t5_run if kind == "t5" else finished_run)("o_lora")  # rank 2r concatenated adapter
    adapter = pathlib.Path(cfg.output_dir) / "adapters" / "2-amazon"
    out = tmp_path / "merged"
    assert main(["--adapter", str(adapter), "--merge", "--output", str(out)]) == 0
    assert f"into {cfg.model}" in capsys.readouterr().out  # the base model was found in the run's metrics.json
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    auto = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    merged = auto.from_pretrained(str(out)).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = load_model(cfg.model, tokenizer)
    data = loop.prepare_data(cfg)[0]
    enc = encoder_for(base.config, tokenizer, cfg.max_source_length, cfg.max_target_length, cfg.chat_template)
    feats, _ = enc.train_features(data.task, data.train_rows[:2])
    batch = collate_train([feats[0], feats[1]], tokenizer.pad_token_id)
    batch.pop("labels")
    if kind == "llama":
        batch.pop("position_ids")
    with torch.no_grad():
        plain = base(**batch).logits
        adapted = PeftModel.from_pretrained(base, str(adapter)).eval()(**batch).logits
        merged_logits = merged(**batch).logits
    assert (merged_logits - adapted).abs().max() <= 1e-5
    assert (adapted - plain).abs().max() > 1e-4  # the adapter changes the model, so the check can fail


def test_export_bad_input(tmp_path, capsys):
    assert main(["--adapter", str(tmp_path), "--merge", "--output", str(tmp_path / "o")]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
    assert main(["--adapter", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "pass --merge" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": null}')
    assert main(["--adapter", str(tmp_path), "--merge", "--output", str(tmp_path / "o")]) == 2
    assert "pass --model" in capsys.readouterr().err
