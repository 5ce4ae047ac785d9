"""Offline data tool: JSONL manifests -> pre-tokenised ArrayRecord shards (bagpiper_jax.data.records).

  python -m data_pipeline.write --manifest=train.jsonl --out_dir=shards/ \\
      --tokenizer=tokenizer.json --codec=xcodec:/models/xcodec-hubert-general --num_workers=8

Modules, one job each:
  manifest.py  parse JSONL lines into work items (which subset, which task), or line-level errors.
  build.py     one work item -> one record (audio -> mel / codes, text -> unified ids), or an error.
  writer.py    shard planning, the process pool, restart markers, errors.jsonl and index.json.
  write.py     the absl command line around writer.write_shards.
"""
