"""One short end-to-end run on the real SmolLM2-135M-Instruct: the saved DEAL adapter reloads with stock
transformers + PEFT (no deal_train import, base model read from the GGUF file) and gives the same predictions."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from deal_train.config import TrainConfig
from deal_train.data import Encoder
from deal_train.train.loop import prepare_data, run
from deal_train.model.loading import load_tokenizer, smollm2_package_dir

STOCK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    pkg, gguf, adapter, prompts_file, out_file, max_new_tokens = sys.argv[1:]
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    base = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    prompts = json.load(open(prompts_file))
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=int(max_new_tokens), do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    json.dump([t.strip() for t in texts], open(out_file, "w"))
""")


def test_smollm2_deal_adapter_reloads_with_stock_peft(tmp_path):
    cfg = TrainConfig(method="deal", model="smollm2-135m-instruct", tasks=["agnews", "amazon"], max_train_samples=8,
                      max_test_samples=8, per_device_train_batch_size=4, max_source_length=160, max_new_tokens=5,
                      per_device_eval_batch_size=8, deal_lambda_drift=1.0, output_dir=str(tmp_path / "run"))
    metrics = run(cfg)
    assert metrics["finished"] and len(metrics["accuracy_matrix"]) == 2
    adapter = tmp_path / "run" / "adapters" / "2-amazon"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # the prompts the run evaluated agnews with after task 2
    tok = load_tokenizer(cfg.model)
    datas = prepare_data(cfg)
    feats, _ = Encoder(tok, cfg.max_source_length, cfg.max_target_length, True).eval_features(
        datas[0].task, datas[0].test_rows)
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps([f["input_ids"] for f in feats]))
    out_file = tmp_path / "stock.json"
    script = tmp_path / "stock.py"
    script.write_text(STOCK_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), smollm2_package_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf",
                           str(adapter), str(prompts_file), str(out_file), str(cfg.max_new_tokens)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deal_train" not in proc.stderr
    stock = json.loads(out_file.read_text())
    ours = [json.loads(line)["prediction"] for line in
            (tmp_path / "run" / "predictions" / "after_2-amazon" / "1-agnews.jsonl").read_text().splitlines()]
    assert stock == ours
    assert any(p for p in ours)  # the model says something
