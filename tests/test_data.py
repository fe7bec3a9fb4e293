"""Prompts, answer masking, truncation, task registry and row validation on the real benchmark files."""

from __future__ import annotations

import json

import pytest

from deal_train.config import ConfigError
from deal_train.data import (IGNORE_INDEX, Encoder, build_prompt, collate_eval, collate_train, load_task, read_rows,
                             task_sequence)


def test_benchmark_sequences():
    assert task_sequence("standard", 1) == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert task_sequence("standard", 2) == ["dbpedia", "amazon", "agnews", "yahoo"]
    assert task_sequence("standard", 3) == ["yahoo", "amazon", "agnews", "dbpedia"]
    assert task_sequence("tc", 1) == ["dbpedia", "yahoo", "agnews"]
    assert len(task_sequence("long", 1)) == 15
    assert task_sequence("tc", 1, ["agnews", "COPA"]) == ["agnews", "COPA"]
    with pytest.raises(ConfigError, match="orders"):
        task_sequence("standard", 4)
    with pytest.raises(ConfigError, match="Unknown task 'nope'"):
        task_sequence("tc", 1, ["nope"])


def test_every_task_loads_with_valid_rows(data_dir):
    for name in task_sequence("long", 1):
        task = load_task(data_dir, name)
        rows = read_rows(task, "test")
        assert rows and all(r["label"] in task.labels for r in rows)


def test_prompt_format(data_dir):
    task = load_task(data_dir, "agnews")
    prompt = build_prompt(task, "Stocks rose.")
    assert prompt == ("Task:TC\nDataset:agnews\nWhat is the topic of the following paragraph? Choose one from the "
                      "option.\nOption: " + ", ".join(task.labels) + " \nStocks rose.\nAnswer:")
    copa = load_task(data_dir, "COPA")
    assert build_prompt(copa, "Q?") == "Task:COPA\nDataset:COPA\nQ?\nAnswer:"


@pytest.mark.parametrize("chat", [True, False])
def test_loss_mask_covers_exactly_answer_and_eos(data_dir, tokenizer, chat):
    task = load_task(data_dir, "dbpedia")
    rows = read_rows(task, "train")[:6]
    enc = Encoder(tokenizer, max_source_length=512, max_target_length=50, chat_template=chat)
    feats, _ = enc.train_features(task, rows)
    batch = collate_train([feats[i] for i in range(len(feats))], tokenizer.pad_token_id)
    for i, row in enumerate(rows):
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        text = tokenizer.decode(labelled)
        expected = (row["label"] if chat else " " + row["label"]) + tokenizer.eos_token
        assert text == expected
        # the EOS is labelled even though the pad token has the same id
        assert labelled[-1] == tokenizer.eos_token_id == tokenizer.pad_token_id
        # left padding: pad positions are masked, have attention 0, and the answer ends the row
        pad = batch["input_ids"].shape[1] - len(feats[i]["input_ids"])
        assert (batch["labels"][i][:pad] == IGNORE_INDEX).all() and (batch["attention_mask"][i][:pad] == 0).all()
        assert batch["labels"][i][-1] == tokenizer.eos_token_id
        assert batch["position_ids"][i][pad:].tolist() == list(range(len(feats[i]["input_ids"])))


def test_truncation_cuts_only_the_sentence(data_dir, tokenizer):
    task = load_task(data_dir, "dbpedia")
    enc = Encoder(tokenizer, max_source_length=120, max_target_length=50, chat_template=True)
    long_sentence = "word " * 500
    ids, cut = enc.encode_prompt(task, long_sentence)
    assert cut and len(ids) <= 120
    text = tokenizer.decode(ids)
    assert "Option: " + ", ".join(task.labels) in text and text.rstrip().endswith("assistant")
    assert "\nAnswer:" in text
    short_ids, short_cut = enc.encode_prompt(task, "A short one.")
    assert not short_cut
    with pytest.raises(ConfigError, match="max_source_length"):
        Encoder(tokenizer, 20, 50, True).encode_prompt(task, "x")


def test_eval_collation_left_pads(tokenizer):
    feats = [{"input_ids": [5, 6, 7], "label": "a", "index": 0}, {"input_ids": [8], "label": "b", "index": 1}]
    batch = collate_eval(feats, tokenizer.pad_token_id)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [tokenizer.pad_token_id] * 2 + [8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_rows_without_gold_label_are_dropped_and_counted(data_dir):
    task = load_task(data_dir, "MNLI")
    dropped = {}
    rows = read_rows(task, "test", dropped)
    assert dropped["test"] > 0 and len(rows) + dropped["test"] == 500
    assert all(r["label"] != "-" for r in rows)


def test_bad_rows_are_reported_with_file_and_row(tmp_path):
    d = tmp_path / "TC" / "agnews"
    d.mkdir(parents=True)
    (d / "labels.json").write_text(json.dumps(["World", "Sports"]))
    (d / "train.json").write_text(json.dumps([{"label": "World", "sentence": "ok"},
                                             {"label": "Cooking", "sentence": "bad label"},
                                             {"label": "Sports", "sentence": "  "}]))
    task = load_task(str(tmp_path), "agnews")
    with pytest.raises(ConfigError) as err:
        read_rows(task, "train")
    msg = str(err.value)
    assert "train.json" in msg and "row 1" in msg and "'Cooking'" in msg and "row 2" in msg
    with pytest.raises(ConfigError, match="test.json not found"):
        read_rows(task, "test")


def test_kept_logits_give_the_full_loss(tokenizer, tiny_model, data_dir):
    """The loss from the last k positions' logits equals the loss from all logits (left padding)."""
    import torch

    from deal_train.model.losses import answer_window, token_cross_entropy_sum

    task = load_task(data_dir, "yahoo")
    rows = read_rows(task, "train")[:5]
    enc = Encoder(tokenizer, max_source_length=200, max_target_length=50, chat_template=True)
    feats, _ = enc.train_features(task, rows)
    batch = collate_train([feats[i] for i in range(len(feats))], tokenizer.pad_token_id)
    with torch.no_grad():
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"])
        full = tiny_model(**kw).logits
        kept = tiny_model(**kw, logits_to_keep=answer_window(batch["labels"])).logits
    ce_full, n_full = token_cross_entropy_sum(full, batch["labels"])
    ce_kept, n_kept = token_cross_entropy_sum(kept, batch["labels"])
    assert kept.shape[1] < full.shape[1] and n_full == n_kept > 0
    assert torch.allclose(ce_full, ce_kept, rtol=1e-5)
    # and it matches transformers' own mean loss
    hf = tiny_model(**kw, labels=batch["labels"]).loss
    assert torch.allclose(ce_full / n_full, hf, rtol=1e-5)


def test_truncated_rows_are_counted_and_reported_per_task(tokenizer, data_dir):
    from deal_train.config import TrainConfig
    from deal_train.train.loop import prepare_data, tokenise, truncation_report
    from deal_train.methods import get_method

    limit = 120
    cfg = TrainConfig(model="tiny-random-llama", tasks=["agnews", "amazon"], max_train_samples=20, max_test_samples=10,
                      max_source_length=limit)
    datas = prepare_data(cfg)
    tokenise(datas, Encoder(tokenizer, limit, 50, True), get_method(cfg))
    uncut = Encoder(tokenizer, 10**6, 50, True)
    expected = []
    for d in datas:
        longer = [len(uncut.encode_prompt(d.task, r["sentence"])[0]) > limit for r in d.train_rows]
        longer_test = sum(len(uncut.encode_prompt(d.task, r["sentence"])[0]) > limit for r in d.test_rows)
        assert (d.truncated_train, d.truncated_test) == (sum(longer), longer_test)
        for row, feat, cut in zip(d.train_rows, d.train_features, longer):
            n_prompt = sum(1 for x in feat["labels"] if x == IGNORE_INDEX)
            assert n_prompt <= limit
            answer = tokenizer.decode([x for x in feat["labels"] if x != IGNORE_INDEX])
            assert answer == row["label"] + tokenizer.eos_token  # never cut from the answer
            if cut:
                prompt = tokenizer.decode(feat["input_ids"][:n_prompt])
                assert "Option: " + ", ".join(d.task.labels) in prompt and "\nAnswer:" in prompt
        if sum(longer) or longer_test:
            expected.append(f"task {d.task.name}: {sum(longer)} of 20 training and {longer_test} of 10 test prompts "
                            f"were longer than max_source_length={limit} tokens; their sentences were cut "
                            f"(instruction, options and answer kept)")
    assert sum(d.truncated_train for d in datas) > 0
    assert truncation_report(datas, limit) == expected
