"""One typed configuration object for a continual run.

Every key has a default, a type and a help string; ``deal_train.cli`` turns the
fields into ``--key value`` command-line options and YAML keys, so the three
ways of setting a value (default, YAML file, command line) always agree.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, get_type_hints

DATA_DIR_ENV = "DEAL_TRAIN_DATA_DIR"
"""Environment variable naming the CL_Benchmark directory when ``data_dir`` is not set."""


class ConfigError(ValueError):
    """Bad user input (a config key, a value, a file). The CLI prints the message and exits with code 2."""


def read_yaml(path: str, what: str) -> Any:
    """The content of the YAML file ``path`` (safe loader; None for an empty file). ``what`` names the file in
    errors ("Config file", "tasks_file").

    Raises:
        ConfigError: "<what> not found: <path>", or "<what> <path> is not valid YAML: <parser message>".
    """
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None


def _f(default: Any, help: str, choices: tuple | None = None):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """All settings of one continual fine-tuning run (see ``--help`` for each key)."""

    # --- what to run -------------------------------------------------------------------------
    method: str = _f("deal", "Continual-learning method: deal (docs/design.md section 3) or a baseline of section 4 "
                             "(the names come from the registry in deal_train.methods).")
    benchmark: str = _f("standard", "Task sequence: tc (3 tasks), standard (4 tasks, orders 1-3), long (15 tasks).",
                        ("tc", "standard", "long"))
    order: int = _f(1, "Task order of the standard benchmark (1, 2 or 3).", (1, 2, 3))
    tasks: list[str] = _f([], "Explicit task sequence (comma-separated names); overrides benchmark/order when set.")
    data_source: str = _f("cl_benchmark", "Where the tasks come from: cl_benchmark (a folder in the CL_Benchmark "
                                          "layout, see data_dir), hub (the 15 tasks' public Hugging Face Hub datasets, "
                                          "converted to the same labels and sentence format, class-balanced, cached "
                                          "under $DEAL_TRAIN_CACHE), files (your own tasks, described in tasks_file).",
                          ("cl_benchmark", "hub", "files"))
    data_dir: str = _f("", f"CL_Benchmark directory (<Type>/<task>/{{train,test,labels}}.json). "
                           f"Empty: ${DATA_DIR_ENV}, else ../shared/cl_benchmark next to the working directory.")
    tasks_file: str = _f("", "data_source files: YAML naming each task's train/test files (JSON, JSON lines or CSV), "
                             "text and label columns, label set and instruction (README, 'Your own tasks').")
    hub_datasets: list[str] = _f([], "data_source hub: replace a task's Hub dataset, as task=owner/name or "
                                     "task=owner/name:config (comma-separated), e.g. amazon=owner/amazon_reviews.")
    dry_run: bool = _f(False, "Build the model's architecture without weights (meta device), print the plan (tasks, "
                              "steps per task, trainable parameters per method, a memory estimate) and exit.")
    output_dir: str = _f("outputs/run", "Where metrics, adapters, predictions and TensorBoard logs go.")
    overwrite_output_dir: bool = _f(False, "Start over even if output_dir holds a finished or partial run.")
    seed: int = _f(42, "Random seed (data order, adapter initialisation, sampling of rows).")

    # --- model and adapter -------------------------------------------------------------------
    model: str = _f("smollm2-135m-instruct",
                    "Hugging Face id or local directory (decoder-only or encoder-decoder such as T5), or an alias: "
                    "smollm2-135m-instruct, tiny-random-llama, tiny-random-t5; or an architecture-only model (random "
                    "weights, no download): smollm2-135m-arch, llama-3.1-8b-arch, t5-large-arch.")
    chat_template: bool = _f(True, "Wrap the prompt in the tokenizer's chat template (when it has one; decoder-only "
                                   "models only).")
    trust_remote_code: bool = _f(False, "Allow a model directory or Hub id to run its own Python code "
                                        "(transformers' trust_remote_code). Only for models you trust.")
    allow_pickle_weights: bool = _f(False, "Allow loading model weights from pickle-based files (pytorch_model.bin, "
                                           ".pt), which can run code when read. By default only safetensors load.")
    lora_rank: int = _f(8, "LoRA rank r.")
    lora_alpha: float = _f(32.0, "LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    target_modules: list[str] = _f([], "Module names that get LoRA adapters (comma-separated). Empty: chosen from "
                                       "the model type (PEFT's defaults: q,v for T5; q_proj,v_proj for LLaMA).")

    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = _f(3e-4, "AdamW learning rate for LoRA parameters (constant, no warm-up).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    num_train_epochs: int = _f(1, "Epochs per task.")
    per_device_train_batch_size: int = _f(8, "Micro batch size per process.")
    gradient_accumulation_steps: int = _f(1, "Micro batches per optimizer step.")
    group_by_length: bool = _f(False, "Batch training rows of similar token length together (less padding): "
                                      "shuffle, sort by length within mega-batches of length_group_size micro "
                                      "batches, longest batch first (as transformers' group_by_length). Off: the "
                                      "plain seeded shuffle.")
    length_group_size: int = _f(50, "With group_by_length: micro batches per mega-batch sorted by length (larger: "
                                    "less padding, less mixing of lengths within the epoch).")
    mixed_precision: str = _f("", "Override Accelerate's mixed precision (no, fp16, bf16); empty keeps the "
                                  "accelerate config's value.")
    logging_steps: int = _f(1, "Log train/loss etc. to TensorBoard every N optimizer steps.")
    subspace_energy: float = _f(0.9, "Share of the history's energy (Σ s² of the earlier tasks' LoRA update, per "
                                      "layer) whose top singular directions form the subspace that the logged "
                                      "subspace/overlap/* measures the new update against; in (0, 1].")
    max_nonfinite_steps: int = _f(5, "Stop after this many consecutive optimizer steps with a NaN/inf loss or "
                                     "gradient (each such step is skipped and counted).")
    checkpoint_every_steps: int = _f(0, "Save a step checkpoint (Accelerate state, adapter, optimizer, RNG and data "
                                        "position) every N optimizer steps inside a task, under "
                                        "output_dir/checkpoints; 0: only when stopped by SIGINT/SIGTERM/SIGUSR1 or "
                                        "non-finite losses. Finished tasks are always saved.")
    resume_from: str = _f("", "Step checkpoint directory to resume the unfinished task from; empty: the newest "
                              "valid one under output_dir/checkpoints (rerunning the same command resumes).")
    full_determinism: bool = _f(False, "Deterministic kernels on GPU (transformers' enable_full_determinism: "
                                       "torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG, cuDNN "
                                       "deterministic); slower. CPU runs are deterministic without it.")

    # --- memory savings (README "Profiles"; deal_train/precision.py) ----------------------------
    model_dtype: str = _f("float32", "Weight dtype of the frozen base model: bfloat16/float16 halve its memory. "
                                     "Trainable LoRA and DEAL tensors stay float32 whatever this is.",
                          ("float32", "bfloat16", "float16"))
    gradient_checkpointing: bool = _f(False, "Recompute each decoder layer's activations in the backward pass "
                                             "(torch non-reentrant checkpointing): less activation memory, about "
                                             "one extra forward pass of time.")
    shared_prefix: bool = _f(True, "Fast path: compute the prompt prefix that every row of a micro batch (and of a "
                                   "task's test set) shares once, as a key/value cache the rows reuse, instead of "
                                   "once per row. Same loss, gradients and predictions up to float rounding. "
                                   "Decoder-only models; training falls back to the full pass under "
                                   "gradient_checkpointing (docs/design.md, 'Fast path').")
    load_in_8bit: bool = _f(False, "Load the base model's linear layers as bitsandbytes LLM.int8 (8-bit) weights "
                                   "(needs the bnb extra: pip install -e .[bnb]).")
    load_in_4bit: bool = _f(False, "Load the base model's linear layers as bitsandbytes NF4 4-bit weights with "
                                   "double quantisation, computing in model_dtype (QLoRA-style; bnb extra).")
    optim: str = _f("adamw", "Optimizer: adamw (torch.optim.AdamW) or adamw_8bit (bitsandbytes AdamW8bit: 8-bit "
                             "moments for tensors of 4096 elements or more).", ("adamw", "adamw_8bit"))

    # --- data --------------------------------------------------------------------------------
    max_train_samples: int = _f(1000, "Training rows per task (at most; 0 = all).")
    max_test_samples: int = _f(500, "Test rows per task (at most; 0 = all).")
    max_source_length: int = _f(512, "Prompt tokens; longer prompts are truncated inside the sentence only.")
    max_target_length: int = _f(50, "Answer tokens (label + EOS) kept for training.")
    max_new_tokens: int = _f(50, "Tokens generated at evaluation (greedy; stops at EOS).")
    per_device_eval_batch_size: int = _f(16, "Batch size for generation at evaluation.")
    eval_zero_shot: bool = _f(False, "Also evaluate the base model on every task before training (zero-shot row).")
    validation_rows: int = _f(100, "Rows per task carved from the training file (a fixed, seed-independent choice per "
                                   "task) as a validation split; never trained on. 0 = no validation split.")
    eval_split: str = _f("test", "Split that fills the accuracy matrix: test (final numbers) or validation (for "
                                 "searches and sweeps; needs validation_rows > 0).", ("test", "validation"))

    # --- DEAL (docs/design.md section 3) -----------------------------------------------------------
    deal_profile: str = _f("tuned", "DEAL settings preset: tuned (our defaults, found by the search in "
                                    "docs/deal_defaults.md) or paper (the paper's literal method: no drift penalty, no "
                                    "residual update, raw regularisers). A preset fills the DEAL keys you do not set "
                                    "yourself.", ("tuned", "paper"))
    deal_learning_rate: float = _f(1e-3, "AdamW learning rate of the DEAL retention and update parameters.")
    deal_kernel: str = _f("heat", "Retention kernel (paper App. F, Table 7): heat (Eq. 8), xexp (x e^-x profile), "
                                  "spline (quadratic B-spline), haar (reference code: one-level 2-D Haar DWT of the "
                                  "factor, learnable scaling of the approximation band).",
                          ("heat", "xexp", "spline", "haar"))
    deal_scales: int = _f(4, "J: number of kernel scales in the spectral filter (Eqs. 7-10; unused by haar).")
    deal_sigma_base: float = _f(0.5, "Kernel widths sigma_j = deal_sigma_base * 2^-j, j = 0..J-1, on singular "
                                     "values normalised to [0, 1] (heat and spline; xexp's width follows its centre).")
    deal_layers: int = _f(1, "K: stacked retention layers (Eq. 9); each later layer re-decomposes its input.")
    deal_activation_retention: str = _f("identity", "Activation between retention layers (applied to each layer's "
                                                    "correction; used only when deal_layers > 1).",
                                        ("identity", "gelu", "tanh"))
    deal_mlp_hidden: int = _f(32, "Hidden width h of the update MLP (Eq. 11).")
    deal_activation: str = _f("gelu", "Activation of the update MLP.", ("gelu", "tanh", "relu", "identity"))
    deal_update: str = _f("both", "Which LoRA factors DEAL updates (paper Fig. 2a).", ("both", "A", "B"))
    deal_lambda_retention: float = _f(0.01, "lambda_1: weight of the retention regulariser (Eq. 12).")
    deal_norm_retention: float = _f(10.0, "a: norm order of the retention regulariser.")
    deal_lambda_update: float = _f(0.001, "lambda_2: weight of the update regulariser (Eq. 12).")
    deal_norm_update: float = _f(2.0, "b: norm order of the update regulariser (a >= b).")
    allow_unordered_norms: bool = _f(False, "Accept deal_norm_retention (a) < deal_norm_update (b); the paper "
                                            "requires a >= b, so this is refused unless set to true.")
    deal_reg_target: str = _f("delta", "Regularise the distance from each parameter's start-of-task value "
                                       "(delta) or the raw parameters as in the paper (raw).", ("delta", "raw"))
    deal_reg_form: str = _f("norm", "Regulariser form: ||x||_p (norm) or ||x||_p^p (power, the paper's).",
                            ("norm", "power"))
    deal_lambda_drift: float = _f(0.003, "Drift penalty sum ||O - Y||_F^2 / ||Y||_F^2 over factors (ours, not the "
                                       "paper's; see docs/design.md section 7).")
    deal_residual_update: bool = _f(True, "Add a trainable residual R (n x r, zero at the start of each task, trained "
                                           "at learning_rate) to every filtered factor: O = MLP(filter(Y)) + R. Gives "
                                           "DEAL LoRA's plasticity; the drift penalty keeps it near the history "
                                           "(ours, not the paper's; off in the paper profile).")
    deal_project_residual: str = _f("none", "Project what each task adds on top of the filtered history (the update "
                                            "MLP's correction and the residual R) off the history's top-k singular "
                                            "directions: O = X_hat + (I - U_k U_k^T)(MLP(X_hat) - X_hat + R), U_k the "
                                            "top-k left singular vectors of Y (lora_A: input directions, A's right "
                                            "singular vectors; lora_B: output directions), fixed at the task's start "
                                            "(docs/design.md section 3.1). none, or the factors it applies to: A, B, "
                                            "both (ours; off in both profiles).", ("none", "A", "B", "both"))
    deal_project_energy: float = _f(0.95, "k of deal_project_residual and deal_grow_adapter: the smallest number of "
                                          "the history's singular values whose sum of s_i^2 reaches this share "
                                          "(0, 1] of sum s^2 "
                                          "(docs/design.md section 3.1).")
    deal_drift_weighting: str = _f("flat", "Drift penalty measure: flat ||O - Y||_F^2 / ||Y||_F^2, or spectral: "
                                           "(sum_i w_i ||u_i^T (O - Y)||^2 + ||(I - U U^T)(O - Y)||_F^2) / ||Y||_F^2 "
                                           "in the history's singular basis U, w_i = s_i / mean(s), so moving a "
                                           "strong direction costs more; equal to flat for a uniform spectrum "
                                           "(docs/design.md section 3.2; ours).", ("flat", "spectral"))
    deal_lambda_drift_history: float | None = _f(None, "Separate drift weight of the history part: lambda_h sum "
                                                       "||X_hat - Y||^2 / ||Y||^2 (X_hat the filtered history). Set "
                                                       "this or deal_lambda_drift_residual to split the drift penalty "
                                                       "into the two parts (docs/design.md section 3.3); null: "
                                                       "deal_lambda_drift.")
    deal_lambda_drift_residual: float | None = _f(None, "Separate drift weight of the residual part: lambda_r sum "
                                                        "||O - X_hat||^2 / ||Y||^2 (what the update MLP and R add). "
                                                        "null: deal_lambda_drift; both null: the unsplit penalty "
                                                        "deal_lambda_drift sum ||O - Y||^2 / ||Y||^2 "
                                                        "(docs/design.md section 3.3).")

    deal_grow_adapter: bool = _f(False, "Rank-growing orthogonal update: every task after the first trains a NEW "
                                        "rank-r LoRA adapter next to the DEAL-filtered earlier ones, its lora_A "
                                        "kept exactly off the input directions the earlier adapters read "
                                        "(A = A0 + R (I - V_k V_k^T), V_k the top-k right singular vectors of the "
                                        "history's sum_i s_i B_i A_i, k by deal_project_energy). The saved adapter "
                                        "after task t has rank (t+1) r, as O-LoRA's (docs/design.md section 3.4; "
                                        "ours; off in both profiles).")

    # --- baselines (docs/design.md section 4) ------------------------------------------------------
    o_lora_lambda_orth: float = _f(0.5, "O-LoRA lambda_orth: weight of sum_i sum_layers sum |A_i A_t^T| (elementwise "
                                        "absolute values) between each earlier adapter's A_i and the new one's A_t.")
    o_lora_lambda_l2: float = _f(0.0, "O-LoRA lambda_l2: weight of the sum of the Frobenius norms of the new "
                                      "adapter's LoRA matrices (the O-LoRA reference code's L2 term).")
    replay_samples_per_task: int = _f(20, "Replay: training rows kept from each earlier task (seeded random choice) "
                                          "and mixed into every later task's training data.")
    ewc_lambda: float = _f(1000.0, "EWC: weight of sum F (theta - theta*)^2, F the diagonal Fisher of the LoRA "
                                   "parameters summed over earlier tasks, theta* their values after the last task.")
    ewc_fisher_batches: int = _f(8, "EWC: training micro batches of a finished task used to estimate its Fisher.")
    lwf_temperature: float = _f(2.0, "LwF: softmax temperature of the distillation from the model before the task.")
    lwf_weight: float = _f(1.0, "LwF: weight of the distillation KL on the answer tokens.")
    osf_preserved_first: float = _f(0.3, "OSF: fraction of each target matrix's smaller dimension whose top "
                                         "singular directions are frozen (preserved) on task 1; the rest is trained.")
    osf_preserved_last: float = _f(0.7, "OSF: the preserved fraction on the last task; task t of T preserves "
                                        "first + (last - first) * t / (T - 1) (PEFT's example: 0.3, 0.5, 0.7).")

    # --- profiling (deal_train.profiling) ---------------------------------------------------------
    profile_memory: bool = _f(False, "Measure each task's peak memory while training and while evaluating (CUDA: "
                                     "max_memory_allocated/reserved; CPU: peak RSS, reset before each phase) and "
                                     "write it to metrics.json (per_task) and TensorBoard (memory/...).")
    memory_snapshot: bool = _f(False, "With profile_memory on CUDA: dump an allocator snapshot of each task's "
                                      "training to <output_dir>/memory_snapshots/<t>-<task>.pickle (open it at "
                                      "https://pytorch.org/memory_viz).")

    def resolved_data_dir(self) -> str:
        """The CL_Benchmark directory to read: ``data_dir``, else ``$DEAL_TRAIN_DATA_DIR``, else ``../shared/cl_benchmark``."""
        if self.data_dir:
            return self.data_dir
        if os.environ.get(DATA_DIR_ENV):
            return os.environ[DATA_DIR_ENV]
        return os.path.join("..", "shared", "cl_benchmark")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PAPER_PROFILE: dict[str, Any] = {
    "deal_lambda_retention": 0.01, "deal_norm_retention": 10.0, "deal_lambda_update": 0.001, "deal_norm_update": 2.0,
    "deal_reg_target": "raw", "deal_reg_form": "norm", "deal_lambda_drift": 0.0, "deal_residual_update": False,
    "deal_project_residual": "none", "deal_drift_weighting": "flat", "deal_lambda_drift_history": None,
    "deal_lambda_drift_residual": None, "deal_grow_adapter": False,
}
"""``deal_profile: paper``: the paper's literal DEAL (Eq. 12 on the raw parameters with the reference scripts'
lambda_1 = 0.01, a = 10, lambda_2 = 0.001, b = 2; no drift penalty, no residual update, none of the round-2
switches: projection, spectral drift weighting, split drift weights, growing adapter)."""

TUNED_PROFILE: dict[str, Any] = {}
"""``deal_profile: tuned``: the TrainConfig defaults (the winner of docs/deal_defaults.md's search)."""

PROFILES = {"tuned": TUNED_PROFILE, "paper": PAPER_PROFILE}

LEGACY_DEFAULTS: dict[str, Any] = {"validation_rows": 0, "deal_residual_update": False}
"""Values that runs saved before these keys existed behaved as (their current defaults differ)."""


def with_legacy_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A config as saved in a run's ``metrics.json`` with every key it lacks (keys added to ``TrainConfig`` after
    the run was made) at the value that reproduces how it ran: ``LEGACY_DEFAULTS``, else the key's default."""
    return {**TrainConfig().to_dict(), **LEGACY_DEFAULTS, **saved}


def apply_profile(values: dict[str, Any]) -> dict[str, Any]:
    """Fill the DEAL keys of ``values['deal_profile']``'s preset that ``values`` does not set itself.

    Args:
        values: config keys set explicitly (YAML file, command line, sweep grid), already coerced.
    Returns:
        A new dict: the preset's values under ``values``.
    """
    return {**PROFILES[values.get("deal_profile", "tuned")], **values}


OPTIONAL_FLOAT = float | None
"""The type of keys that take a number or null (YAML ``null``/``~``; ``null``, ``none`` or empty on the command line)."""
NULL_WORDS = ("", "null", "none", "~")


def config_fields() -> list[tuple[str, type, Any, dict]]:
    """(name, type, default, metadata) for every config key, in declaration order."""
    hints = get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((f.name, hints[f.name], default, dict(f.metadata)))
    return out


def coerce_value(name: str, typ: type, value: Any, source: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to the key's type.

    Raises:
        ConfigError: the value cannot be read as that type; the message names the key and the source.
    """
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ == OPTIONAL_FLOAT:
            if value is None or (isinstance(value, str) and value.strip().lower() in NULL_WORDS):
                return None
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if isinstance(value, (list, dict)):
                raise ValueError
            return "" if value is None else str(value)
        if typ == list[str]:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, (list, tuple)):
                return [str(v) for v in value]
            raise ValueError
    except (TypeError, ValueError):
        pass
    else:
        return value
    tname = ("list of strings (comma-separated)" if typ == list[str]
             else "float or null" if typ == OPTIONAL_FLOAT else typ.__name__)
    raise ConfigError(f"{source}: key '{name}' expects a {tname}, got {value!r}.")


def validate(cfg: TrainConfig) -> None:
    """Check values that are wrong on their own (choices, ranges). Task and file checks live in ``data``.

    Raises:
        ConfigError: naming the key and what to do.
    """
    for name, _typ, _default, meta in config_fields():
        choices = meta.get("choices")
        if choices is not None and getattr(cfg, name) not in choices:
            raise ConfigError(f"Config key '{name}' = {getattr(cfg, name)!r} is not one of {list(choices)}.")
    if cfg.eval_split == "validation" and cfg.validation_rows <= 0:
        raise ConfigError("eval_split is 'validation' but validation_rows is 0: set validation_rows > 0 (e.g. 100).")
    positive = ["lora_rank", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                "max_source_length", "max_target_length", "max_new_tokens", "per_device_eval_batch_size",
                "deal_scales", "deal_layers", "deal_mlp_hidden", "logging_steps", "max_nonfinite_steps", "ewc_fisher_batches",
                "length_group_size"]
    for name, typ, _default, _meta in config_fields():
        value = getattr(cfg, name)
        if (typ is float or (typ == OPTIONAL_FLOAT and value is not None)) and not math.isfinite(value):
            raise ConfigError(f"Config key '{name}' must be a finite number, got {value}.")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"Config key '{name}' must be > 0, got {getattr(cfg, name)}.")
    for name in ["learning_rate", "deal_learning_rate", "deal_sigma_base", "lwf_temperature", "lora_alpha"]:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"Config key '{name}' must be > 0, got {getattr(cfg, name)}.")
    for name in ["validation_rows", "checkpoint_every_steps", "max_train_samples", "max_test_samples",
                 "deal_lambda_retention", "deal_lambda_update",
                 "deal_lambda_drift", "weight_decay", "max_grad_norm", "lora_dropout", "o_lora_lambda_orth",
                 "o_lora_lambda_l2", "replay_samples_per_task", "ewc_lambda", "lwf_weight"]:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"Config key '{name}' must be >= 0, got {getattr(cfg, name)}.")
    for name in ["deal_lambda_drift_history", "deal_lambda_drift_residual"]:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise ConfigError(f"Config key '{name}' must be >= 0 or null (null: use deal_lambda_drift), got "
                              f"{getattr(cfg, name)}.")
    if not 0 < cfg.deal_project_energy <= 1:
        raise ConfigError(f"Config key 'deal_project_energy' must be in (0, 1] (the share of the history's energy "
                          f"sum s_i^2 whose directions deal_project_residual protects; e.g. 0.95), got "
                          f"{cfg.deal_project_energy}.")
    if cfg.deal_project_residual in ("A", "B") and cfg.deal_update not in ("both", cfg.deal_project_residual):
        raise ConfigError(f"deal_project_residual is {cfg.deal_project_residual!r} but deal_update is "
                          f"{cfg.deal_update!r}: DEAL does not map lora_{cfg.deal_project_residual}, so there is "
                          f"nothing to project. Set deal_project_residual to {cfg.deal_update!r} (or both), or "
                          f"deal_update to both.")
    if not 0 < cfg.subspace_energy <= 1:
        raise ConfigError(f"Config key 'subspace_energy' must be in (0, 1] (a share of the history's energy, e.g. "
                          f"0.9), got {cfg.subspace_energy}.")
    if cfg.lora_dropout >= 1:
        raise ConfigError(f"Config key 'lora_dropout' must be in [0, 1) (a probability; 1 drops every LoRA input), "
                          f"got {cfg.lora_dropout}.")
    if cfg.deal_norm_retention < 1 or cfg.deal_norm_update < 1:
        raise ConfigError("deal_norm_retention (a) and deal_norm_update (b) must be >= 1 (they are norm orders).")
    if cfg.deal_norm_retention < cfg.deal_norm_update and not cfg.allow_unordered_norms:
        raise ConfigError(f"deal_norm_retention (a = {cfg.deal_norm_retention:g}) is below deal_norm_update "
                          f"(b = {cfg.deal_norm_update:g}); DEAL's Eq. 12 needs a >= b. Swap them, or set "
                          f"allow_unordered_norms: true (--allow_unordered_norms true) to run it anyway.")
    if cfg.mixed_precision not in ("", "no", "fp16", "bf16"):
        raise ConfigError(f"Config key 'mixed_precision' = {cfg.mixed_precision!r}: use no, fp16 or bf16 (or leave "
                          f"empty to take the accelerate config's value).")
    if cfg.data_source == "files" and not cfg.tasks_file:
        raise ConfigError("data_source: files needs tasks_file, the YAML that describes your tasks (see README, "
                          "'Your own tasks').")
    for entry in cfg.hub_datasets:
        if "=" not in entry or not entry.split("=", 1)[1].strip():
            raise ConfigError(f"hub_datasets entry {entry!r}: write task=owner/name or task=owner/name:config.")
    if cfg.load_in_8bit and cfg.load_in_4bit:
        raise ConfigError("load_in_8bit and load_in_4bit are both true: choose one quantisation of the base model.")
    if cfg.memory_snapshot and not cfg.profile_memory:
        raise ConfigError("memory_snapshot: true needs profile_memory: true (the snapshot is taken by the memory "
                          "profiler); set both.")
