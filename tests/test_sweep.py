"""``python -m deal_train.sweep``: grid parsing, one directory per point, sweep.md / sweep.json with one row each,
finished points read back, bad grids refused with exit code 2."""

from __future__ import annotations

import json

import pytest
import yaml

from deal_train.train import loop as loop_module
from deal_train.config import ConfigError, TrainConfig
from deal_train.tools.sweep import grid_points, main, parse_grid, point_configs, point_name

SWEEP_RUN = dict(model="tiny-random-llama", tasks=["agnews", "amazon"], max_train_samples=8, max_test_samples=4,
                 per_device_train_batch_size=4, max_source_length=128, max_new_tokens=3,
                 per_device_eval_batch_size=4, lora_rank=4, deal_mlp_hidden=8, method="deal")


def test_parse_grid_coerces_and_takes_the_cartesian_product():
    grid = parse_grid(["deal_kernel=heat, haar", "lora_rank=4,8", "allow_unordered_norms=true,no"])
    assert grid == [("deal_kernel", ["heat", "haar"]), ("lora_rank", [4, 8]), ("allow_unordered_norms", [True, False])]
    points = grid_points(grid)
    assert len(points) == 8 and points[0] == {"deal_kernel": "heat", "lora_rank": 4, "allow_unordered_norms": True}
    assert points[1]["allow_unordered_norms"] is False and points[-1]["deal_kernel"] == "haar"
    assert point_name(points[0]) == "deal_kernel=heat,lora_rank=4,allow_unordered_norms=true"
    assert point_name({"model": "org/some model"}) == "model=org_some_model"
    assert parse_grid(["deal_sigma_base=1e-1,0.5"]) == [("deal_sigma_base", [0.1, 0.5])]


@pytest.mark.parametrize("specs,message", [
    ([], "at least one --grid"),
    (["deal_kernel"], "key=value1"),
    (["=heat"], "key=value1"),
    (["no_such_key=1,2"], "unknown config key"),
    (["lora_rank=4,eight"], "expects a int"),
    (["lora_rank=4,,8"], "no empty entry"),
    (["lora_rank="], "no empty entry"),
    (["lora_rank=4,4"], "same value twice"),
    (["deal_sigma_base=0.5,5e-1"], "same value twice"),
    (["lora_rank=4", "lora_rank=8"], "twice"),
    (["tasks=dbpedia,amazon"], "cannot be swept"),
    (["output_dir=a,b"], "cannot be swept"),
])
def test_bad_grids_are_refused(specs, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(specs)


def test_invalid_points_and_name_clashes_are_refused_before_running():
    base = TrainConfig(output_dir="root")
    with pytest.raises(ConfigError, match="deal_norm_update=20.*a >= b"):
        point_configs(base, parse_grid(["deal_norm_update=2,20"]))
    with pytest.raises(ConfigError, match="share the directory name"):
        point_configs(base, parse_grid(["model=a/b,a_b"]))
    (name, settings, cfg), = point_configs(base, parse_grid(["deal_kernel=xexp"]))
    assert name == "deal_kernel=xexp" and cfg.output_dir == "root/deal_kernel=xexp" and cfg.deal_kernel == "xexp"


def test_sweep_runs_one_directory_per_point_and_writes_rows(tmp_path, monkeypatch, capsys):
    config_file = tmp_path / "base.yaml"
    config_file.write_text(yaml.safe_dump({**SWEEP_RUN, "deal_kernel": "spline", "output_dir": "ignored"}))
    root = tmp_path / "sweep"
    ran = []
    real_run = loop_module.run  # compare imports it when it runs
    monkeypatch.setattr(loop_module, "run", lambda cfg: ran.append(cfg.deal_kernel) or real_run(cfg))
    argv = ["--config", str(config_file), "--grid", "deal_kernel=heat,haar", "--output_dir", str(root)]
    assert main(argv) == 0
    assert ran == ["heat", "haar"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["deal_kernel=haar", "deal_kernel=heat"]

    result = json.loads((root / "sweep.json").read_text())
    assert result["tasks"] == ["agnews", "amazon"] and result["grid"] == {"deal_kernel": ["heat", "haar"]}
    assert "deal_kernel" not in result["config"] and result["config"]["lora_rank"] == 4
    assert [r["point"] for r in result["points"]] == ["deal_kernel=heat", "deal_kernel=haar"]
    for row in result["points"]:
        metrics = json.loads((root / row["point"] / "metrics.json").read_text())
        assert metrics["finished"] and metrics["config"]["deal_kernel"] == row["settings"]["deal_kernel"]
        assert metrics["config"]["max_train_samples"] == 8 and metrics["config"]["tasks"] == ["agnews", "amazon"]
        assert row["average_accuracy"] == metrics["average_accuracy"]
        assert row["backward_transfer"] == metrics["backward_transfer"]
        assert row["wall_seconds"] == metrics["wall_seconds"]
        assert row["trainable_parameters"] == max(p["trainable_parameters"] for p in metrics["per_task"])
        second = metrics["per_task"][1]
        assert row["later_train_seconds_per_sample"] == pytest.approx(second["train_seconds"]
                                                                      / second["train_samples"])
        assert second["train_samples"] == 8
        assert row["later_trainable_parameters"] == second["trainable_parameters"]
    heat, haar = result["points"]
    # the DEAL task trains different parameter sets: J × (r + 1) per factor vs one scale per Haar coefficient
    assert heat["later_trainable_parameters"] != haar["later_trainable_parameters"]

    md = (root / "sweep.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| deal_kernel | AA (%) | BWT (%) | Trainable params | Trainable params (tasks 2+) | "
                               "Wall time | Train ms/sample (tasks 2+) |")
    assert [line.split(" | ")[0] for line in table[1:]] == ["| heat", "| haar"]
    assert f"| {heat['trainable_parameters']:,} | {heat['later_trainable_parameters']:,} |" in table[1]
    assert f"{1000 * haar['later_train_seconds_per_sample']:.1f}" in table[2]

    # a second call reads both points back, also when the saved config predates this keys (their
    # defaults are the earlier behaviour); a grid over an unknown key exits 2 without running anything
    ran.clear()
    heat_metrics = root / "deal_kernel=heat" / "metrics.json"
    old = json.loads(heat_metrics.read_text())
    for key in ("deal_layers", "deal_activation_retention", "deal_sigma_base", "allow_unordered_norms"):
        del old["config"][key]
    heat_metrics.write_text(json.dumps(old))
    assert main(argv) == 0 and ran == []
    capsys.readouterr()
    assert main(argv[:2] + ["--grid", "deal_kernal=heat", "--output_dir", str(root)]) == 2
    assert "unknown config key 'deal_kernal'" in capsys.readouterr().err and ran == []


def test_comparable_config_fills_keys_added_later_with_their_defaults():
    from deal_train.train.loop import comparable_config

    now = TrainConfig(deal_kernel="haar", output_dir="x").to_dict()
    saved = {k: v for k, v in now.items() if k not in ("deal_layers", "deal_sigma_base")}
    assert comparable_config(saved) == comparable_config(now)
    assert "output_dir" not in comparable_config(now)
    assert comparable_config({**saved, "deal_layers": 2}) != comparable_config(now)
