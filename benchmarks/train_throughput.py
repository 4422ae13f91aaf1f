"""Training speed per model and precision (fp32 vs bf16 autocast), channels_last.

    .venv/bin/python benchmarks/train_throughput.py [--models lite0-finetune,cnn3] [--sizes 128,224]

Prints a markdown table of training images/s (forward + backward + AdamW step on
random 0..255 input, batch 32, after warm-up). bf16 only pays off on CPUs with
AMX or AVX512-BF16; `bloodcell train --precision auto` picks it only there.
"""
import argparse
import time

import torch

from bloodcell.models import create_model
from bloodcell.runtime import autocast
from bloodcell.cpu import has_native_bf16


def measure(name, size, precision, batch=32, steps=4):
    torch.manual_seed(0)
    m = create_model(name, 8, size).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-3)
    x = (torch.rand(batch, 3, size, size) * 255).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 8, (batch,))
    dev = torch.device("cpu")

    def step():
        with autocast(dev, precision):
            loss = torch.nn.functional.cross_entropy(m(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="cnn3,lite0-finetune")
    ap.add_argument("--sizes", default="128,224")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    print(f"threads={torch.get_num_threads()} native_bf16={has_native_bf16()}\n")
    print("| model | size | fp32 img/s | bf16 img/s | bf16 speed-up |")
    print("|---|---|---|---|---|")
    for name in a.models.split(","):
        for size in map(int, a.sizes.split(",")):
            f = measure(name, size, "fp32", steps=a.steps)
            b = measure(name, size, "bf16", steps=max(1, a.steps // 2))
            print(f"| {name} | {size} | {f:.1f} | {b:.1f} | {b / f:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
