"""Print llama.cpp's logits for a GGUF file and token ids as JSON (run with a Python that has llama_cpp).

    python llama_cpp_logits.py model.gguf 1,5,9,2   ->   {"logits": [[...], ...]}   (one row per token)

Used by the optional parity test; kept standalone so it can run in a separate environment.
"""

import json
import sys


def main() -> None:
    import llama_cpp

    path, ids = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(64, len(ids) + 8), logits_all=True, verbose=False,
                          n_threads=1, n_gpu_layers=0, type_k=0, type_v=0)  # f32 KV cache: no fp16 rounding
    llm.eval(ids)
    print(json.dumps({"logits": [list(map(float, llm.scores[i])) for i in range(len(ids))]}))


if __name__ == "__main__":
    main()
