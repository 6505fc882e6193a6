"""kd.eval.report: table cells against numpy, and the per-seed runs files that let a later
session add seeds to a table without rerunning the earlier ones."""

import json
import pathlib
import subprocess

import numpy as np
import pytest

from kd.eval import report

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mean_std_is_the_sample_std():
  v = [16.8, 17.1, 16.95]
  assert report.mean_std(v) == f'{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}' == '16.95 ± 0.15'
  assert report.mean_std([0.5123], 100, 1) == '51.2'
  assert report.mean_std([-1e-4, 1e-4, -2e-4]) == '0.00 ± 0.00'  # not '-0.00'
  assert report.mean_std([-0.004]) == '0.00' and report.mean_std([-0.006]) == '-0.01'


def test_runs_round_trip_and_are_stamped_with_the_commit(tmp_path):
  path = str(tmp_path / 'x.runs.json')
  runs = {'0': {'full': {'perplexity': 16.8}, 'teacher': {'perplexity': 16.6}}, '1': {}}
  report.save_runs(path, runs)
  git = lambda *a: subprocess.run(['git', *a], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
  head = git('rev-parse', 'HEAD')
  if git('status', '--porcelain', '--untracked-files=no'):
    head += '-dirty'  # results from uncommitted code say so
  got = report.load_runs(path)
  assert got == {'0': {**runs['0'], report.COMMIT: head}, '1': {}}  # an empty seed: no stamp
  assert not (tmp_path / 'x.runs.json.tmp').exists()
  report.save_runs(path, got)  # a stamped seed keeps its commit
  assert json.load(open(path))['0'][report.COMMIT] == head


def test_merge_adds_what_only_the_prior_has_and_this_run_wins():
  prior = {'0': {'a': {'v': 1}, 'teacher': {'v': 9}, report.COMMIT: 'old0'},
           '1': {'a': {'v': 2}, 'b': {'v': 3}, report.COMMIT: 'old1'},
           '10': {'a': {'v': 4}, report.COMMIT: 'old10'}}
  runs = {'1': {'a': {'v': 20}}, '2': {'a': {'v': 5}}, '3': {}}
  merged = report.merge_runs(runs, prior)
  assert list(merged) == ['0', '1', '2', '10']  # by number, not as strings; '3' has nothing
  assert merged['1'] == {'a': {'v': 20}, 'b': {'v': 3}}  # its commit goes: HEAD stamps it
  assert merged['0'] == prior['0'] and merged['10'] == prior['10']
  assert prior['1']['a'] == {'v': 2}  # the inputs are left as they were
  rows = report.by_row(merged, ['teacher', 'a', 'b', 'c'])
  assert rows == {'teacher': [{'v': 9}], 'a': [{'v': 1}, {'v': 20}, {'v': 5}, {'v': 4}],
                  'b': [{'v': 3}], 'c': []}


def test_a_bad_runs_file_says_what_it_needs(tmp_path):
  with pytest.raises(FileNotFoundError, match='--prior takes a <stem>.runs.json'):
    report.load_runs(str(tmp_path / 'missing.json'))
  (tmp_path / 'bad.json').write_text('[1, 2]')
  with pytest.raises(ValueError, match='is not a runs file'):
    report.load_runs(str(tmp_path / 'bad.json'))
