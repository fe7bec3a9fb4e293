"""Split of one DEAL (task 2) train step against LoRA on SmolLM2-135M, ms per step (CPU, fp32, batch 8 real
dbpedia rows, LoRA r=8 on q_proj,v_proj): LoRA fwd+bwd, DEAL fwd+bwd uncached / inside ``forward_context``,
the factor builds alone (every DEALFactor once) and the regulariser (incl. drift) alone. Median of --repeats,
interleaved. ``python scripts/profile_deal_step.py [--repeats 5] [--threads 2]``; needs DEAL_TRAIN_DATA_DIR."""
import argparse, statistics, time, torch
from deal_train.config import TrainConfig
from deal_train.data import Encoder, collate_train
from deal_train.deal import DEALFactor
from deal_train.methods import get_method
from deal_train.model.loading import load_tokenizer
from deal_train.model.losses import answer_forward, token_cross_entropy_sum
from deal_train.model.precision import load_base_model
from deal_train.train.loop import prepare_data, tokenise

ap = argparse.ArgumentParser(); ap.add_argument("--repeats", type=int, default=5)
ap.add_argument("--threads", type=int, default=2); a = ap.parse_args()
torch.set_num_threads(a.threads)
kw = dict(model="smollm2-135m-instruct", tasks=["dbpedia"], max_train_samples=8, max_test_samples=1,
          per_device_train_batch_size=8, lora_rank=8, output_dir="unused")
def build(name):
    cfg = TrainConfig(method=name, **kw); tok = load_tokenizer(cfg.model)
    datas = prepare_data(cfg); m = get_method(cfg)
    tokenise(datas, Encoder(tok, cfg.max_source_length, cfg.max_target_length, True), m)
    torch.manual_seed(0); model = m.wrap(load_base_model(cfg, tok, torch.device("cpu"))); m.before_task(model, 0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n: p.normal_(0, 0.02)
    m.before_task(model, 1); model.train()
    return m, model, collate_train([datas[0].train_features[i] for i in range(8)], tok.pad_token_id)
def step(m, model, batch, cached):
    t = time.perf_counter(); model.zero_grad(set_to_none=True)
    with (m.forward_context(model) if cached else torch.enable_grad()):
        out = answer_forward(model, batch); ce, n = token_cross_entropy_sum(out.logits, batch["labels"])
        extra, _ = m.extra_loss(model, batch, out); loss = ce / n + (extra if extra is not None else 0)
    loss.backward(); return (time.perf_counter() - t) * 1e3
def alone(fn):
    t = time.perf_counter(); fn(); return (time.perf_counter() - t) * 1e3
lora, deal = build("seq_lora"), build("deal")
factors = [f for f in deal[1].modules() if isinstance(f, DEALFactor)]
def builds():
    loss = sum(f.factor().sum() for f in factors); loss.backward()
res = {k: [] for k in ("lora", "deal_uncached", "deal_cached", "factor_build_fwd_bwd", "regulariser_fwd_bwd")}
for r in range(a.repeats + 1):
    v = {"lora": step(*lora, False), "deal_uncached": step(*deal, False), "deal_cached": step(*deal, True),
         "factor_build_fwd_bwd": alone(builds), "regulariser_fwd_bwd": alone(lambda: deal[0].regularisation()[0].backward())}
    if r: [res[k].append(x) for k, x in v.items()]
for k, xs in res.items(): print(f"{k:22s} median {statistics.median(xs):8.1f} ms  min {min(xs):8.1f} max {max(xs):8.1f}")
for k in ("deal_uncached", "deal_cached"):
    rs = [d / l for d, l in zip(res[k], res["lora"])]
    print(f"{k}/lora ratio median {statistics.median(rs):.3f} min {min(rs):.3f} max {max(rs):.3f}")
print("factors:", len(factors))
