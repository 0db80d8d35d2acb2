"""bf16 on a CPU: how much faster than fp32, and how far apart the answers are.

`auto` precision keeps fp32 on every CPU (a result should not depend on which CPU made it), but CPUs
with AVX512-BF16 or AMX run bf16 matrix products natively. This measures, in one process on the
built-in SmolLM2-135M-Instruct, alternating the two dtypes so that load from other processes falls
on both alike:

- a forward pass over 8 x 128 tokens (generation and ranking);
- a forward and backward pass through a LoRA adapter (training);
- agreement: the log-probabilities of 50 quoted answers after one prompt (`gcsl generate
  --rank-catalogue`'s scores) under each dtype, their largest difference and the Spearman rank
  correlation of the two orders.

    OMP_NUM_THREADS=1 python benchmarks/cpu_bf16.py --repeats 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gcsl.generation.ranking import answer_ids, candidate_logprobs
from gcsl.models import load_causal_lm, load_tokenizer

TITLES = ["Star Wars", "Contact", "Fargo", "Return of the Jedi", "Liar Liar", "English Patient, The", "Scream",
          "Toy Story", "Air Force One", "Independence Day (ID4)", "Raiders of the Lost Ark", "Godfather, The",
          "Pulp Fiction", "Twelve Monkeys", "Silence of the Lambs, The", "Jerry Maguire", "Rock, The",
          "Empire Strikes Back, The", "Star Trek: First Contact", "Back to the Future", "Titanic", "Mission: Impossible",
          "Fugitive, The", "Indiana Jones and the Last Crusade", "Willy Wonka and the Chocolate Factory",
          "Princess Bride, The", "Forrest Gump", "Saint, The", "Monty Python and the Holy Grail", "Full Monty, The",
          "Men in Black", "Terminator, The", "E.T. the Extra-Terrestrial", "Dead Man Walking", "Leaving Las Vegas",
          "Schindler's List", "Braveheart", "Usual Suspects, The", "Alien", "Blade Runner", "Heat", "Casablanca",
          "Good Will Hunting", "Sense and Sensibility", "L.A. Confidential", "Shawshank Redemption, The",
          "Jurassic Park", "Apollo 13", "Batman", "Aliens"]


def _seconds(fn, model) -> float:
    start = time.perf_counter()
    fn(model)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3, help="timings per dtype (the fastest counts)")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(args.model)
    models = {name: load_causal_lm(args.model, dtype=dtype, device="cpu").eval()
              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    x = torch.randint(0, len(tokenizer), (8, 128), generator=torch.Generator().manual_seed(0))

    def forward(model):
        with torch.inference_mode():
            model(input_ids=x)

    lora = {name: get_peft_model(load_causal_lm(args.model, dtype=m.dtype, device="cpu"),
                                 LoraConfig(r=13, lora_alpha=32, target_modules="all-linear"))
            for name, m in models.items()}

    def train_step(model):
        model(input_ids=x, labels=x).loss.backward()
        model.zero_grad(set_to_none=True)

    rows = []
    for what, fn, table in (("forward 8x128", forward, models), ("LoRA forward+backward 8x128", train_step, lora)):
        times = {name: [] for name in table}
        for _ in range(args.repeats):  # alternate, so background load falls on both
            for name, model in table.items():
                times[name].append(_seconds(fn, model))
        fp32, bf16 = min(times["fp32"]), min(times["bf16"])
        rows.append((what, fp32, bf16))

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "The user has watched and rated these movies (1-5 stars), oldest first:\n"
                                     "1. \"Heat\": 4 stars\n2. \"Alien\": 5 stars\nRecommend one movie the user "
                                     "will like next. Answer with the title in quotes."}],
        add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answers = answer_ids(tokenizer, [f'"{t}"' for t in TITLES])
    scores = {name: np.array(candidate_logprobs(m, ids, answers, batch_size=50)) for name, m in models.items()}
    ranks = {name: np.argsort(np.argsort(-s)) for name, s in scores.items()}
    rho = float(np.corrcoef(ranks["fp32"], ranks["bf16"])[0, 1])

    print(f"{args.model}, {torch.get_num_threads()} thread(s), fastest of {args.repeats} alternating runs")
    print("| pass | fp32 s | bf16 s | fp32 / bf16 |")
    print("|---|---|---|---|")
    for what, fp32, bf16 in rows:
        print(f"| {what} | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.2f}x |")
    print(f"answer log-probabilities ({len(TITLES)} titles): largest |fp32 - bf16| "
          f"{np.abs(scores['fp32'] - scores['bf16']).max():.3f} nats, Spearman rho of the two orders {rho:.3f}, "
          f"same top answer: {int(np.argmax(scores['fp32'])) == int(np.argmax(scores['bf16']))}")


if __name__ == "__main__":
    main()
