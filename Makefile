PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= ocspmint-demo

.PHONY: demo test bench bench-stage bench-nethsm bench-publish bench-s3 bench-peers bench-scale bench-deps fuzz system-deps venv clean

system-deps:
	bash scripts/install-system-deps.sh

$(BIN)/ocspmint: pyproject.toml setup.py native/ocspmint_p11.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/ocspmint

## Debian packages only the benchmarks need (golang-cfssl for bench-peers).
bench-deps:
	bash scripts/install-bench-deps.sh

## Build a demo CA + SoftHSM2 token in ./$(DEMO) and run the pipeline once.
demo: system-deps venv
	rm -rf $(DEMO)
	$(BIN)/ocspmint demo --dir $(DEMO)

## The whole test suite (real SoftHSM2, openssl ca, openssl ocsp, pkilint).
test: system-deps venv
	$(BIN)/python -m pytest -q

## Signing throughput against the raw PKCS#11 ceiling (see bench/RESULTS.md); BENCH_ARGS="" for stores on disk.
BENCH_ARGS ?= --store-dir /dev/shm --drop-stores
bench: system-deps venv
	$(BIN)/python bench/sign_throughput.py $(BENCH_ARGS)

## The signing stage alone: C loop ceiling vs SignerPool native/python, P-256 and RSA-2048, 1 and 2 workers
## (bench/sign_stage.py; STAGE_ARGS e.g. "--repeat 1 --seconds 1 --markdown"); bench/plot_workers.png if matplotlib imports.
STAGE_ARGS ?=
bench-stage: system-deps venv
	$(call bench_and_plot,sign_stage.py,sign_stage.json,--stage,plot_workers.png,$(STAGE_ARGS))

## Simulated network HSM: C loop vs ocspmint's native signer by sessions in flight (bench/nethsm_throughput.py;
## NETHSM_ARGS e.g. "--seconds 1 --key rsa-2048"); bench/plot_sessions.png if matplotlib imports.
NETHSM_ARGS ?=
bench-nethsm: system-deps venv
	$(call bench_and_plot,nethsm_throughput.py,nethsm.json,--nethsm,plot_sessions.png,$(NETHSM_ARGS))

# $(call bench_and_plot,SCRIPT,JSON,PLOTS_FLAG,PNG,ARGS): run bench/SCRIPT into build/JSON, then draw
# bench/PNG with bench/plots.py PLOTS_FLAG when matplotlib imports.
define bench_and_plot
	mkdir -p build
	$(BIN)/python bench/$(1) --json build/$(2) $(5)
	if $(BIN)/python -c 'import matplotlib' 2>/dev/null; then $(BIN)/python bench/plots.py $(3) build/$(2); \
	else echo "no matplotlib: pip install -e '.[bench]' for bench/$(4)"; fi
endef

## S3 upload: client libraries and S3Store vs a raw PUT loop on SeaweedFS.
bench-publish: system-deps venv
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/publish_throughput.py

## End to end to S3: `ocspmint run` (SoftHSM2 signing) into SeaweedFS vs the raw obstore PUT loop, bare and
## with S3Store's headers (bench/s3_end_to_end.py; S3_ARGS e.g. "--serials 2000 --repeat 1 --markdown").
S3_ARGS ?=
bench-s3: system-deps venv
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python bench/s3_end_to_end.py $(S3_ARGS)

## ocspmint against cfssl ocsprefresh, openssl ocsp, a pyca loop and openssl speed
## (bench/peers.py; PEERS_ARGS e.g. "--serials 2000 --repeat 1 --key rsa-2048 --markdown").
PEERS_ARGS ?=
bench-peers: system-deps bench-deps venv
	$(BIN)/python bench/peers.py $(PEERS_ARGS)

## Scale: 10k, 100k, 1M, 10M ledger rows (bench/scale.py; SCALE_ARGS e.g. "--sizes 10000 100000 --markdown").
SCALE_ARGS ?=
bench-scale: system-deps venv
	$(BIN)/python bench/scale.py $(SCALE_ARGS)

## Fuzz the OCSP request parser for FUZZ_SECONDS (atheris, fuzz/fuzz_request.py).
## Seeds: fuzz/corpus (remade by fuzz/make_corpus.py); new inputs and crashes go to build/fuzz/.
FUZZ_SECONDS ?= 60
fuzz: venv
	$(BIN)/pip install -q 'atheris>=2.3'
	$(BIN)/python fuzz/make_corpus.py fuzz/corpus
	mkdir -p build/fuzz/corpus
	$(BIN)/python fuzz/fuzz_request.py build/fuzz/corpus fuzz/corpus -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=build/fuzz/

clean:
	rm -rf $(DEMO) build *.egg-info .pytest_cache
