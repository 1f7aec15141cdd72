"""Print llama.cpp's token ids for texts as JSON (run with a Python that has llama_cpp).

    python llama_cpp_tokens.py model.gguf texts.json   ->   {"plain": [[...], ...], "special": [[...], ...]}

Only the vocabulary is loaded. Special tokens written in the text are parsed as such; "plain" adds no BOS/EOS,
"special" adds what the file's vocabulary asks for (llama_tokenize's add_special). Used by the optional tokenizer
parity test; kept standalone so it can run in a separate environment.
"""

import json
import sys


def main() -> None:
    import llama_cpp

    path, texts = sys.argv[1], json.load(open(sys.argv[2], encoding="utf-8"))
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    print(json.dumps({kind: [llm.tokenize(t.encode("utf-8"), add_bos=add, special=True) for t in texts]
                      for kind, add in (("plain", False), ("special", True))}))


if __name__ == "__main__":
    main()
