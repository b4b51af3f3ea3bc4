"""python -m megatron_lite.data: prepare a corpus ahead of training, with train.py's config and overrides.

    python -m megatron_lite.data data=text 'data.paths=[corpus/**/*.jsonl.gz]' data.workers=16
    python -m megatron_lite.data data=text 'data.paths=[corpus/*.parquet]' data.tokenizer=path/to/hf-model
    python -m megatron_lite.data --clean [data.cache_dir=DIR]

It prints where the cache is and what it holds; train.py with the same data.* settings finds it. Run it again to
check a prepared cache: its token files are compared with their checksums (and, with data.verify_corpus=true,
the corpus files with theirs). Several copies may run at once, on several nodes sharing the cache directory: one
builds, the others wait for it; Ctrl-C stops the build, and the next run resumes it. --clean removes what no
preparation will use again (damaged copies, failed or abandoned builds, locks of dead processes).
Exit status: 0 done, 2 bad input (one line naming the value and the fix), 130 interrupted.
"""
import re
import sys
from dataclasses import fields
from pathlib import Path


def usage() -> str:
    """This docstring and every data.* key with its default and comment, read from the schema's source."""
    from megatron_lite.data import config
    source = Path(config.__file__).read_text()
    lines = [__doc__.strip(), "", "data.* keys (any train.py key is accepted too; configs/data/*.yaml are presets):"]
    for f in fields(config.DataConfig):
        m = re.search(rf"^\s+{f.name}: [^=]+= (.+?)(?:\s+#\s*(.*))?$", source, re.M)
        default, comment = (m.group(1), m.group(2) or "") if m else ("", "")
        default = {"None": "null", "True": "true", "False": "false", "field(default_factory=list)": "[]"}.get(default, default)
        lines.append(f"  data.{f.name}={default}  {comment}".rstrip())
    return "\n".join(lines)


def main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from megatron_lite.config import Config  # registers the schema that configs/config.yaml extends
    from megatron_lite.data import DataError, prepare_corpus
    from megatron_lite.data.clean import clean
    from megatron_lite.data.prepare import cache_root

    cleaning = "--clean" in sys.argv
    sys.argv = [a for a in sys.argv if a != "--clean"]

    @hydra.main(config_path="../../configs", config_name="config", version_base="1.3")
    def run(dict_cfg: DictConfig) -> None:
        try:
            cfg: Config = OmegaConf.to_object(dict_cfg)
            if cleaning:
                clean(cache_root(cfg.data))
                return
            corpus = prepare_corpus(cfg.data, progress_bar=sys.stderr.isatty())  # verified or built by this process
        except MissingMandatoryValue as e:
            _fail(f"{e.full_key} is required: set it on the command line ({e.full_key}=...)")
        except DataError as e:
            _fail(str(e))
        print(corpus.summary() + "\n  checksums verified", flush=True)

    run()


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(usage())
        sys.exit(0)
    try:
        main()
    except KeyboardInterrupt:  # the workers are stopped, the lock released, the progress saved
        print(f"{chr(10) if sys.stderr.isatty() else ''}interrupted: the preparation stops here; run the same command again to "
              f"resume it", file=sys.stderr)
        sys.exit(130)
