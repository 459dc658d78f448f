"""Where a locate-then-edit edit step goes, and what optimising the target values of a batch together buys.

    python benchmarks/locate_step.py --editor alphaedit --threads 1   # SmolLM2-135M, CounterFact, 20 requests
    python benchmarks/locate_step.py --editor memit --threads 1 --one-at-a-time 5

Run it from the repository root. The editor is set up as `evaluate.py experiment=smollm2-cf-locate-1000/<editor>`
sets it up (statistics from its cache, or computed first and not timed). The batch is the first edit batch
of that run: `--edits` CounterFact-val requests. `predict_update` is timed `--repeats` times, split into
  target values  the z optimisation of all requests at once (forward and backward passes, Adam)
  keys           the passes that read each module's keys and the block's current output
  solves         the editor's closed form for each module
and, on the first `--one-at-a-time` requests of the same batch, the z optimisation of one request after
another twice: with rledit's passes, and as the published code (ROME/MEMIT's compute_z) runs it, every row
whole through the whole model with a hook writing delta, log-softmax over the whole vocabulary at every
position, stopped once the whole loss is below 5e-2. Their seconds per request times the batch size are set
beside the batched z optimisation, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from harness import compose_config

from rledit.data.collate import TokenizedBatch
from rledit.data.streams import EditStream
from rledit.editors.locate import LocateEditor, _hidden
from rledit.pipeline import build_editor, build_experiment, set_up_editor
from rledit.threads import cpu_threads

PHASES = {"target values": "_target_values", "keys": "_keys_and_outputs", "solves": "solve"}


@contextmanager
def timed_phases(editor: LocateEditor) -> Iterator[dict[str, float]]:
    """Within the block, the editor's phase methods add their seconds to the yielded dict."""
    seconds = {phase: 0.0 for phase in PHASES}

    def timed(phase: str, method: Callable) -> Callable:
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - start
        return run

    for phase, name in PHASES.items():
        setattr(editor, name, timed(phase, getattr(editor, name)))
    try:
        yield seconds
    finally:
        for name in PHASES.values():
            delattr(editor, name)  # the class's methods again


def time_step(editor: LocateEditor, model, modules, batch) -> dict[str, float]:
    """Seconds of one `predict_update` of `batch`, in total and per phase."""
    with timed_phases(editor) as seconds:
        start = time.perf_counter()
        editor.predict_update(model, modules, batch)
        seconds["total"] = time.perf_counter() - start
    return seconds


def editor_z(editor: LocateEditor, model, batch: TokenizedBatch) -> torch.Tensor:
    """The editor's own z optimisation of `batch`'s requests."""
    return editor._target_values(model, editor._prompt_rows(batch), editor._kl_rows(batch), batch.num_rows)


def time_one_at_a_time(editor: LocateEditor, model, collator, records,
                       z: Callable[[LocateEditor, object, TokenizedBatch], torch.Tensor] = editor_z) -> float:
    """Seconds of the z optimisation `z` of `records`, one request after another."""
    start = time.perf_counter()
    for record in records:
        z(editor, model, collator([record]).edit)
    return time.perf_counter() - start


def published_z(editor: LocateEditor, model, batch: TokenizedBatch) -> torch.Tensor:
    """One request's z computed as the published code computes it, on the editor's rows and options."""
    o = editor.options
    rows = TokenizedBatch.concat([editor._prompt_rows(batch), editor._kl_rows(batch)])
    kl_row, where = rows.num_rows - 1, (torch.arange(rows.num_rows), rows.subject_last)
    kl_at = int(rows.attention_mask[kl_row].sum()) - 1
    targets = rows.labels[:, 1:][rows.target_mask[:, :-1]]
    token_rows = rows.target_mask.nonzero()[:, 0]
    block = model.get_submodule(editor.z_block)
    delta, read = None, []

    def write(module, args, output):
        hidden = _hidden(output)
        if delta is None:  # the unedited pass: h
            read.append(hidden[where].detach())
        else:
            hidden = hidden.index_put(where, delta.expand(rows.num_rows, -1).to(hidden.dtype), accumulate=True)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(write)
    try:
        with torch.no_grad():
            reference = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits[kl_row, kl_at]
        reference = reference.float().log_softmax(-1)
        h = read[0][0]
        delta = torch.zeros_like(h, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=o["z_lr"])
        with torch.enable_grad():
            for _ in range(o["z_steps"]):
                log_probs = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits.float() \
                    .log_softmax(-1)
                per_token = F.nll_loss(log_probs[rows.target_mask], targets, reduction="none")
                nll = (torch.zeros(rows.num_rows).index_add(0, token_rows, per_token)
                       / rows.target_mask.sum(-1).clamp(min=1))[:kl_row].mean()
                kl = (reference.exp() * (reference - log_probs[kl_row, kl_at])).sum()
                loss = nll + o["kl_factor"] * kl + o["weight_decay"] * (delta.norm() / h.norm()) ** 2
                if float(loss.detach()) < 5e-2:
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    delta.mul_((o["clamp_norm"] * h.norm() / delta.norm()).clamp(max=1.0))
    finally:
        handle.remove()
    return h + delta.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--editor", default="alphaedit", help="memit, alphaedit, emmet or rome (default alphaedit)")
    parser.add_argument("--edits", type=int, default=20, help="requests in the batch (default 20)")
    parser.add_argument("--repeats", type=int, default=2, help="timed edit steps (default 2)")
    parser.add_argument("--one-at-a-time", type=int, default=5,
                        help="requests whose z optimisation is also timed alone (default 5; 0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of configs/evaluate.yaml")
    args = parser.parse_args()
    cfg = compose_config("evaluate", [f"experiment=smollm2-cf-locate-1000/{args.editor}", *args.overrides])
    with cpu_threads(args.threads):
        torch.manual_seed(cfg.seed)
        experiment = build_experiment(cfg)
        editor = build_editor(cfg, experiment)
        set_up_editor(cfg, experiment, editor)
        modules = {name: em.module for name, em in experiment.editable.items()}
        records = next(iter(EditStream(experiment.data.eval, 1, args.edits, cfg.seed).steps))
        batch = experiment.collator(records).edit
        steps = [time_step(editor, experiment.model, modules, batch) for _ in range(args.repeats)]
        alone = (time_one_at_a_time(editor, experiment.model, experiment.collator, records[:args.one_at_a_time])
                 if args.one_at_a_time else None)
        published = (time_one_at_a_time(editor, experiment.model, experiment.collator, records[:args.one_at_a_time],
                                         z=published_z) if args.one_at_a_time else None)
        threads = torch.get_num_threads()  # inside cpu_threads: the count the steps ran with
    print(f"editor={args.editor}, {args.edits} requests, {len(modules)} modules, {threads} "
          f"thread(s), torch {torch.__version__}; median of {args.repeats} steps"
          f"{''.join(' ' + o for o in args.overrides)}\n")
    print("| phase | seconds per edit step | share |\n|---|---|---|")
    total = statistics.median(s["total"] for s in steps)
    for phase in [*PHASES, "total"]:
        median = statistics.median(s[phase] for s in steps)
        print(f"| {phase} | {median:.1f} | {median / total:.2f} |")
    print(f"\nseconds per edit: {total / args.edits:.2f}")
    if alone is not None:
        batched = statistics.median(s["target values"] for s in steps)
        for way, seconds in (("with rledit's passes", alone), ("as the published code computes it", published)):
            scaled = seconds / args.one_at_a_time * args.edits
            print(f"target values one request at a time, {way}: {seconds / args.one_at_a_time:.2f} s per request, "
                  f"{scaled:.1f} s for the batch ({args.one_at_a_time} timed): {scaled / batched:.2f}x the batched "
                  f"{batched:.1f} s")


if __name__ == "__main__":
    main()
