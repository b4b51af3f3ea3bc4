"""Prepare a corpus ahead of training, with the same Hydra config (and overrides) as train.py:

    python -m megatron_lite.data data=text 'data.paths=[corpus/**/*.jsonl.gz]' data.workers=16
    python -m megatron_lite.data data=text 'data.paths=[corpus/*.parquet]' data.tokenizer=path/to/hf-model

prints where the cache is and what it holds; train.py with the same data.* settings finds it. Run it again to
check a prepared cache: every token file is compared with its checksum. Several copies may run at once, on several nodes
sharing the cache directory: one builds, the others wait for it.
"""
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from megatron_lite.config import Config  # registers the schema that configs/config.yaml extends
from megatron_lite.data import DataError, prepare_corpus


@hydra.main(config_path="../../configs", config_name="config", version_base="1.3")
def main(dict_cfg: DictConfig) -> None:
    try:
        cfg: Config = OmegaConf.to_object(dict_cfg)
        corpus = prepare_corpus(cfg.data, progress_bar=sys.stderr.isatty())  # verified (or built) by this process
    except MissingMandatoryValue as e:
        _fail(f"{e.full_key} is required: set it on the command line ({e.full_key}=...)")
    except DataError as e:
        _fail(str(e))
    print(corpus.summary() + "\n  checksums verified", flush=True)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
