"""Running Bagpiper: KV-cache decoding (engine.py), sampling and masks (sampling.py), requests and
prompts (requests.py), model loading (loading.py), the command line (__main__.py) and the training
loop's sample action (sample_action.py). docs/generation.md describes the decoding rules."""
