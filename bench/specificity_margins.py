"""Which neighbourhood prompts an edit run flipped, and by how much: specificity case by case.

    python bench/specificity_margins.py EXPORTED_MODEL --limit 30 --output OUT.json
    python bench/specificity_margins.py --limit 1000 --prefixes 200 500 1000   # unedited only

Specificity counts the neighbourhood prompts whose true answer beats the edit's new target
(NLL(p, true) < NLL(p, new)); a rate hides whether a drop is many prompts pushed a long way or
one prompt that sat on the fence. This scores the first ``--limit`` requests' neighbourhood
prompts on the unedited model and on an edited model saved by a run (``export``), and
prints, per prompt, the margin NLL(p, new) - NLL(p, true) before and after (> 0: specific) with
the prompts that changed side marked. ``--prefixes`` prints the specificity of the first k
requests for each k: the unedited figure a validation after k edits compares against (it scores
the requests edited so far). Without an edited model only the unedited side is scored. Run by
hand from the repository root.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_alphaedit.models import ModelConfig, load_model, load_tokenizer
from lightning_alphaedit.paths import write_text_atomic
from lightning_alphaedit.requests import read_requests
from lightning_alphaedit.scoring import score_answers
from lightning_alphaedit.targets import ModelTargets

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-edit.json"


def margins(model: torch.nn.Module, tokenizer, prompts: list[str], true: list[str], new: list[str]) -> torch.Tensor:
    """NLL(p, new) - NLL(p, true) per prompt, (n,): positive where the true answer is preferred."""
    targets = ModelTargets(model)
    return (score_answers(model, tokenizer, targets, prompts, new).nll
            - score_answers(model, tokenizer, targets, prompts, true).nll).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("edited", type=Path, nargs="?", help="folder of the edited model (a run's export)")
    parser.add_argument("--unedited", default="smollm2-135m", help="the model the run started from")
    parser.add_argument("--data", type=Path, default=DATA, help="the edit requests of the run")
    parser.add_argument("--limit", type=int, required=True, help="the run's first N requests")
    parser.add_argument("--prefixes", type=int, nargs="*", default=[], help="also the specificity of the first k requests")
    parser.add_argument("--output", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data} is absent (the shared CounterFact data, or give --data)")

    requests = read_requests(args.data)[: args.limit]
    rows = [(i, r, n) for i, r in enumerate(requests) for n in r.neighborhood_prompts if r.target_true is not None]
    prompts = [n.prompt for _, _, n in rows]
    true, new = [n.target for _, _, n in rows], [r.target_new for _, r, _ in rows]
    config = ModelConfig(name_or_path=args.unedited, dtype="float32")
    tokenizer = load_tokenizer(config)
    before = margins(load_model(config, tokenizer), tokenizer, prompts, true, new)
    after = before if args.edited is None else margins(
        load_model(ModelConfig(name_or_path=str(args.edited), dtype="float32"), tokenizer), tokenizer, prompts, true, new)
    owners = torch.tensor([i for i, _, _ in rows])  # (n,) the request each prompt belongs to
    for k in args.prefixes:
        rows_k = owners < k  # the neighbourhood prompts of the first k requests
        print(f"first {k} requests: specificity unedited {100 * (before[rows_k] > 0).float().mean():.2f}"
              + ("" if args.edited is None else f", edited {100 * (after[rows_k] > 0).float().mean():.2f}"))

    flipped = (before > 0) != (after > 0)
    if args.edited is not None:
        print(f"{len(rows)} neighbourhood prompts of {len(requests)} requests: specificity "
              f"{100 * (before > 0).float().mean():.1f} -> {100 * (after > 0).float().mean():.1f}, "
              f"mean margin change {float((after - before).mean()):+.3f} nats, {int(flipped.sum())} changed side")
    records = []
    for (_, request, neighbour), b, a, f in zip(rows, before.tolist(), after.tolist(), flipped.tolist()):
        records.append({"case_id": request.case_id, "prompt": neighbour.prompt, "true": neighbour.target,
                        "new": request.target_new, "margin_before": b,
                        **({} if args.edited is None else {"margin_after": a, "flipped": f})})
        if f:
            print(f"  case {request.case_id}: {neighbour.prompt!r} {neighbour.target!r} vs {request.target_new!r}: "
                  f"margin {b:+.3f} -> {a:+.3f}")
    if args.output:
        write_text_atomic(args.output, json.dumps(records, indent=1))

if __name__ == "__main__":
    main()
