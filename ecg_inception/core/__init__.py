"""The neutral floor: small helpers every room may use; imports nothing else of ecg_inception.

- `plain`: three conversions with three meanings (`from_omegaconf`, `to_plain`, `json_ready`);
- `hashing`: sha256 of bytes and of files;
- `sizes`: `image_size` values <-> (height, width);
- `cpus`: usable CPUs and a scoped torch thread count;
- `locks`: an exclusive file lock between processes;
- `compose`: compose a shipped Hydra config (tests, benchmarks, examples);
- `provenance`: which code made a run (versions, source digest, git commit), for every metrics.json;
- `moved`: the deprecation shims of moved modules and names.
"""
