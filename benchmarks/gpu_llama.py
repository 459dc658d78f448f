"""RLEdit on a Llama-3-8B-shaped model with random bf16 weights: seconds per edit step, memory, kernel TFLOP/s.

    python benchmarks/gpu_llama.py                       # on a GPU: the full-size model, 100 edits per step
    python benchmarks/gpu_llama.py --small --threads 1   # anywhere (a CPU smoke test): 2 layers, hidden 256

The model is built from its configuration (no download): LlamaConfig with Llama-3-8B's sizes (32 layers,
hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocabulary 128256), random weights in bf16, about 16 GB.
The untrained RLEdit editor of configs/editor/rledit.yaml, one round without the prior, edits the layers of
configs/model/llama3-8b-instruct.yaml (gate_proj 11-15, up_proj 18-24: 12 modules of 4096 -> 14336).
Prompts and targets are random tokens (timing does not depend on what they say); one batch is edited
first and stays committed, as in benchmarks/edit_step.py. It prints markdown:
  - the edit step split into its phases against the floor (a bare forward + backward of the same batch),
    measured as benchmarks/edit_step.py measures it;
  - the peak memory of one edit step;
  - the fused low-rank kernel (Triton on CUDA) at the shape and N (captured target tokens) of this edit
    step, in TFLOP/s against a plain bf16 matmul producing a matrix of the same size from the same factors.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from edit_step import markdown_table, measure, timed_end_to_end
from harness import ONE_ROUND_RLEDIT, compose_config, format_bytes, peak_bytes_of
from hydra.utils import instantiate
from kernel import fused_and_matmul_seconds
from transformers import AutoModelForCausalLM, LlamaConfig

from rledit.data.collate import IGNORE_INDEX, TokenizedBatch
from rledit.kernels.lowrank import resolve_backend
from rledit.models.layers import resolve_edit_modules
from rledit.runtime import freeze
from rledit.session import EditSession


@dataclass(frozen=True)
class Size:
    """A model size and the edit batch that goes with it."""

    config: LlamaConfig
    edit_modules: list[str] | None  # None: the layers of configs/model/llama3-8b-instruct.yaml
    edits: int
    prompt_tokens: int
    target_tokens: int


FULL = Size(LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
            edit_modules=None, edits=100, prompt_tokens=24, target_tokens=4)
# The same architecture scaled down so that it runs on a CPU in seconds; gate_proj in the earlier layer and
# up_proj in the later one, as the full model's layer choice has them.
SMALL = Size(LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=896, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
             edit_modules=["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj"],
             edits=4, prompt_tokens=24, target_tokens=4)


def random_edit_batch(edits: int, prompt_tokens: int, target_tokens: int, vocab_size: int,
                      device: torch.device, generator: torch.Generator) -> TokenizedBatch:
    """Rows of random prompt tokens followed by random target tokens, labelled like EditCollator's."""
    length = prompt_tokens + target_tokens
    input_ids = torch.randint(0, vocab_size, (edits, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :prompt_tokens] = IGNORE_INDEX
    target_mask = torch.zeros(edits, length, dtype=torch.bool)
    target_mask[:, prompt_tokens - 1:length - 1] = True  # the logits there predict the target tokens
    return TokenizedBatch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                          target_mask=target_mask, request_index=torch.arange(edits)).to(device)


def build_session(size: Size, device: torch.device) -> EditSession:
    """The random-weight bf16 model, frozen, with the untrained one-round RLEdit editor on its edited layers."""
    cfg = compose_config("train", ["model=llama3-8b-instruct", "editor=rledit", *ONE_ROUND_RLEDIT])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(size.config, dtype=torch.bfloat16)
    freeze(model)
    editable = resolve_edit_modules(model, size.edit_modules or list(cfg.model.edit_modules))
    shapes = {name: (em.d_out, em.d_in) for name, em in editable.items()}
    editor = instantiate(cfg.editor.build)(module_shapes=shapes).to(device)
    return EditSession(model, editable, editor)


def memory_and_kernel_table(session: EditSession, batch: TokenizedBatch, captured_tokens: int, repeats: int,
                            device: torch.device) -> str:
    """Weights, the peak memory of one edit step, and the kernel against a matmul at this step's shapes."""
    weights = sum(p.numel() * p.element_size() for p in session.model.parameters())
    step_peak, how = peak_bytes_of(lambda: timed_end_to_end(session, batch, device), device)
    lines = ["| quantity | value |", "|---|---:|",
             f"| model weights (bf16) | {format_bytes(weights)} |",
             f"| edit step peak on top of what was live ({how}) | {format_bytes(step_peak)} |"]
    if device.type == "cuda":
        lines.append(f"| peak during that edit step, everything live included (cuda max_memory_allocated) | "
                     f"{format_bytes(torch.cuda.max_memory_allocated(device))} |")
    backend = resolve_backend("auto", device)
    for d_out, d_in in sorted({(em.d_out, em.d_in) for em in session.editable.values()}):
        fused, matmul = fused_and_matmul_seconds(d_in, d_out, captured_tokens, repeats, device)
        tflop = 2 * captured_tokens * d_in * d_out / 1e12
        lines += [(f"| fused kernel ({backend}), {d_in}x{d_out}, N={captured_tokens} | {fused * 1e3:.3f} ms, "
                  f"{tflop / fused:.2f} TFLOP/s |"),
                  f"| bf16 matmul, same shapes | {matmul * 1e3:.3f} ms, {tflop / matmul:.2f} TFLOP/s |",
                  f"| fused / matmul throughput | {matmul / fused:.2f} |"]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="2 layers, hidden 256, 4 edits (runs on a CPU)")
    parser.add_argument("--edits", type=int, default=None, help="edits per step (default 100; 4 with --small)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warm-up", type=int, default=1, help="untimed rounds first (Triton compiles there)")
    parser.add_argument("--device", default=None, help="default: cuda when there is one (cpu with --small)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SMALL if args.small else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() or not args.small else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU here: the full-size model needs one (about 16 GB of bf16 weights); run "
                         "with --small for the CPU smoke test, or --device cpu to try the full size anyway")
    edits = args.edits or size.edits
    torch.manual_seed(args.seed)
    session = build_session(size, device)
    generator = torch.Generator().manual_seed(args.seed)
    history, batch = (random_edit_batch(edits, size.prompt_tokens, size.target_tokens, size.config.vocab_size,
                                        device, generator) for _ in range(2))
    result = measure(session, batch, history, args.repeats, args.warm_up, device)
    c = size.config
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Llama-3-8B-shaped model{' (--small)' if args.small else ''}: {c.num_hidden_layers} layers, hidden "
          f"{c.hidden_size}, MLP {c.intermediate_size}, vocabulary {c.vocab_size}, random bf16 weights; RLEdit "
          f"(untrained) on {len(session.editable)} modules; {edits} edits per step = {edits} rows x "
          f"{size.prompt_tokens + size.target_tokens} tokens, {result.captured_tokens} target tokens; device "
          f"{name}, torch {torch.__version__}; median of {args.repeats} rounds after {args.warm_up} warm-up\n")
    print(markdown_table(result))
    print(f"\nseconds per edit step (EditSession.edit): {result.median('end_to_end'):.3f}\n")
    print(memory_and_kernel_table(session, batch, result.captured_tokens, args.repeats, device))


if __name__ == "__main__":
    main()
