# BMI: the two commands a newcomer runs on a fresh Debian 12 machine.
#   make demo   install everything, bring up a throwaway stack, run the user's guide workflow
#   make test   install everything and run every test suite against real daemons
.PHONY: install test demo lint stack-up stack-down bench

install:
	bash scripts/install-deps

test: install
	bash scripts/run-tests

demo: install
	bash scripts/demo

lint: install
	.venv/bin/ruff check ims hilsim tests benchmarks acceptance-tests scripts/*.py scripts/install-service

stack-up: install
	scripts/bmi-stack up

stack-down:
	scripts/bmi-stack down

# `make bench`: a throwaway stack, the floor and BMI through REST in one run; writes docs/performance.md
bench: install
	.venv/bin/python benchmarks/bench.py
