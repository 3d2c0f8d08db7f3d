# twotower: `make demo` and `make test` install what they need, then run.
PY ?= python3
PIP ?= $(PY) -m pip
# The CPU build of torch is pinned first: an unpinned torch pulls a multi-GB CUDA build.
# On a GPU machine: make demo TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= offline,test
# The offline data root (SciFact, Wikipedia text, MS MARCO sample) when it sits beside the repo.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)),)
export TWOTOWER_DATA ?= $(SHARED_DATA)
endif
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
STAMP := .make/installed-$(EXTRAS)

.PHONY: install demo test bench rehearse clean
install: $(STAMP)
$(STAMP): pyproject.toml
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[$(EXTRAS)]"
	@mkdir -p .make && touch $@

demo: install
	$(PY) pretrain/demo.py

test: install
	$(PY) -m pytest tests -q --durations=15

bench: EXTRAS = offline,test,bench
# Full-size measurements (hours on 2 CPU cores); each script also runs alone, see README.
bench: install
	$(PY) -m benchmarks.hybrid
	$(PY) -m benchmarks.perf encode train memory scaling padding --full --docs 512 --repeats 3 --steps 3 --warmup 1 --train-repeats 3
	$(PY) -m benchmarks.st_backends
	$(PY) -m benchmarks.pretrain_quality
	$(PY) -m benchmarks.quality reference label_free domain_adapt ablation other_corpus --reuse
	$(PY) -m benchmarks.quality fewshot fewshot_dual st_reference_lr curve distil domain_adapt_distil distil_dev --seeds 0 1 2 --reuse
	$(PY) -m benchmarks.quality label_free domain_adapt --seeds 42 1 2 --reuse
	$(PY) -m benchmarks.quality ablation --seeds 42 1 2 --reuse

# every committed GPU recipe on 2 CPU processes with tiny models and synthetic data (5-10 min)
rehearse: install
	$(PY) -m benchmarks.rehearse

clean:
	rm -rf .make runs
