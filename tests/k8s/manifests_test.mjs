// The Kubernetes manifests (deploy/k8s) against the Kubernetes API schemas
// and against the muonps binary they run:
//   1. `kubectl kustomize` renders the base and every overlay;
//   2. every rendered object validates against its schema, with no field the
//      schema does not know (schema_check.mjs);
//   3. the settings agree with the binary and with one another
//      (contract_check.mjs): flags, MUONPS_* variables, ports, probes,
//      addresses, selectors, volumes, security; the cluster secret, the
//      user tokens, the checkpoint and data roots, the NetworkPolicies, and
//      in the TLS variant (overlays/tls) mutual TLS on every role with TCP
//      probes and certificates naming what members dial.
// Self-tests first show that each checker rejects a broken manifest.
//
//   node tests/k8s/manifests_test.mjs REPO_ROOT MUONPS_BINARY [NODE_MODULES]
//
// NODE_MODULES (default /opt/muonps-tools/node_modules) holds the npm modules
// scripts/install_deps.sh installs. Exit 0 when every check passes, 1 when
// one fails, 77 (skipped) without kubectl (kustomize v5) or the modules.

import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';

import { MuonpsBinary } from './binary_flags.mjs';
import { checkContract } from './contract_check.mjs';
import { SchemaChecker } from './schema_check.mjs';

const kSkipped = 77;
// The variant whose every role must speak mutual TLS.
const kTlsTarget = 'overlays/tls';

function skip(reason) {
  console.log(`SKIPPED: ${reason}`);
  process.exit(kSkipped);
}

const [repo, binary, nodeModules = '/opt/muonps-tools/node_modules'] = process.argv.slice(2);
if (!repo || !binary) {
  console.error('usage: node manifests_test.mjs REPO_ROOT MUONPS_BINARY [NODE_MODULES]');
  process.exit(2);
}

// --- Preconditions -------------------------------------------------------

const version = spawnSync('kubectl', ['version', '--client'], { encoding: 'utf8' });
if (version.error) skip('kubectl not installed');
const kustomize = version.stdout.match(/Kustomize Version: v(\d+)/);
if (!kustomize || Number(kustomize[1]) < 5) {
  skip(`kubectl's kustomize is older than v5 (${version.stdout.trim().replace(/\n/g, '; ')})`);
}
const schemas = new SchemaChecker(nodeModules);
const missing = schemas.missingPackages();
if (!fs.existsSync(path.join(nodeModules, 'yaml', 'package.json'))) missing.push('yaml');
if (missing.length > 0) {
  skip(`npm modules missing from ${nodeModules}: ${missing.join(', ')} (scripts/install_deps.sh installs them)`);
}
const YAML = createRequire(path.join(nodeModules, 'index.js'))('yaml');

// --- Reporting -----------------------------------------------------------

let passed = 0;
let failed = 0;
let skipped = 0;

// One named check: it passes when `problems` is empty.
function check(name, problems) {
  if (problems.length === 0) {
    passed++;
    console.log(`ok   ${name}`);
    return;
  }
  failed++;
  console.log(`FAIL ${name}`);
  for (const problem of problems) console.log(`       ${problem}`);
}

// A self-test: `problems` (from a checker given a broken input) must include
// one matching `expected`.
function expectProblem(name, problems, expected) {
  const hit = problems.some((problem) => expected.test(problem));
  check(`self-test: ${name}`, hit ? [] : [`expected a problem matching ${expected}, got: ${JSON.stringify(problems)}`]);
}

// --- The checkers, on broken input ---------------------------------------

let muonps;
try {
  muonps = new MuonpsBinary(binary);
} catch (error) {
  console.log(`FAIL reading muonps's flags: ${error.message}`);
  process.exit(1);
}

function sampleDeployment() {
  return {
    apiVersion: 'apps/v1',
    kind: 'Deployment',
    metadata: { name: 'sample', labels: { 'app.kubernetes.io/name': 'sample', 'any/label': 'x' } },
    spec: {
      selector: { matchLabels: { app: 'sample' } },
      template: {
        metadata: { labels: { app: 'sample' } },
        spec: {
          containers: [{
            name: 'sample',
            image: 'sample:1',
            imagePullPolicy: 'IfNotPresent',
            ports: [{ name: 'grpc', containerPort: 7070 }],
            resources: { limits: { cpu: '1', memory: '1Gi', 'nvidia.com/gpu': 1 } },
          }],
        },
      },
    },
  };
}

check('self-test: a valid Deployment passes', await schemas.check(sampleDeployment()));
{
  const misspelled = sampleDeployment();
  const container = misspelled.spec.template.spec.containers[0];
  container.imagePullPolcy = container.imagePullPolicy;
  delete container.imagePullPolicy;
  expectProblem('a misspelled field fails', await schemas.check(misspelled),
    /^unknown field spec\.template\.spec\.containers\[0\]\.imagePullPolcy$/);
  const mistyped = sampleDeployment();
  mistyped.spec.template.spec.containers[0].ports[0].containerPort = 'grpc';
  expectProblem('a wrongly typed field fails', await schemas.check(mistyped), /containerPort must be integer/);
  const noKind = { apiVersion: 'apps/v1', kind: 'Deploymnet', metadata: { name: 'x' } };
  expectProblem('an unknown kind fails', await schemas.check(noKind), /no schema for apps\/v1 Deploymnet/);
}
expectProblem('a misspelled PodMonitor field fails', await schemas.check({
  apiVersion: 'monitoring.coreos.com/v1',
  kind: 'PodMonitor',
  metadata: { name: 'x' },
  spec: { selector: { matchLabels: { a: 'b' } }, podMetricsEndpoints: [{ port: 'metrics', paht: '/metrics' }] },
}), /^unknown field spec\.podMetricsEndpoints\[0\]\.paht$/);
{
  const certificate = {
    apiVersion: 'cert-manager.io/v1',
    kind: 'Certificate',
    metadata: { name: 'x' },
    spec: { secretName: 'x-tls', issuerRef: { name: 'ca' }, dnsName: ['x'] },
  };
  const missingPackage = schemas.missingOptionalPackage(certificate);
  if (missingPackage) {
    skipped++;
    console.log(`skip self-test: a misspelled Certificate field fails: npm ${missingPackage} is not installed`);
  } else {
    expectProblem('a misspelled Certificate field fails', await schemas.check(certificate), /^unknown field spec\.dnsName$/);
  }
}
{
  const env = muonps.environmentProblems(new Map([
    ['MUONPS_LISTEN', '0.0.0.0:7070'],
    ['MUONPS_NO_SUCH_FLAG', '1'],
    ['MUONPS_PORT_FILE', '/tmp/port'],
    ['MUONPS_MIN_SHARDS', 'two'],
  ]));
  check('self-test: MUONPS_LISTEN sets --listen', env.has('MUONPS_LISTEN') ? [env.get('MUONPS_LISTEN')] : []);
  expectProblem('a variable naming no flag fails', [...env.values()], /MUONPS_NO_SUCH_FLAG names no flag/);
  expectProblem('a variable muonps ignores fails', [...env.values()], /MUONPS_PORT_FILE names --port_file, but muonps does not read it/);
  expectProblem('a value the flag rejects fails', [...env.values()], /--min_shards rejects the value 'two'/);
  expectProblem('a flag of another command fails', [muonps.flagProblem('min_shards', 'worker')].filter(Boolean),
    /--min_shards is for coordinator/);
  expectProblem('a flag of other commands fails', [muonps.flagProblem('checkpoint_root', 'worker')].filter(Boolean),
    /--checkpoint_root is for coordinator\/shard/);
  check('self-test: a flag of several commands passes for each',
    ['coordinator', 'shard', 'worker'].map((role) => muonps.flagProblem('cluster_secret_file', role)).filter(Boolean));
}

// --- The manifests ---------------------------------------------------------

const k8s = path.join(repo, 'deploy', 'k8s');
const overlays = path.join(k8s, 'overlays');
const targets = ['base', ...fs.readdirSync(overlays).sort()
  .filter((name) => fs.existsSync(path.join(overlays, name, 'kustomization.yaml')))
  .map((name) => `overlays/${name}`)];

check(`${kTlsTarget} exists (the TLS variant)`, targets.includes(kTlsTarget) ? [] : [`no ${kTlsTarget}/kustomization.yaml`]);

const renders = new Map();  // target -> objects
for (const target of targets) {
  const run = spawnSync('kubectl', ['kustomize', path.join(k8s, target)], { encoding: 'utf8' });
  const problems = run.status === 0 ? [] : [run.error?.message ?? run.stderr.trim()];
  let objects = [];
  if (problems.length === 0) {
    const documents = YAML.parseAllDocuments(run.stdout);
    for (const document of documents) {
      for (const error of document.errors) problems.push(`YAML: ${error.message}`);
    }
    objects = documents.map((document) => document.toJS()).filter((object) => object !== null);
    if (objects.length === 0) problems.push('rendered no objects');
  }
  check(`${target}: kubectl kustomize renders ${objects.length} objects`, problems);
  if (problems.length === 0) renders.set(target, objects);
}

for (const [target, objects] of renders) {
  for (const object of objects) {
    const name = `${target}: ${object.kind}/${object.metadata?.name} matches its schema`;
    const missingPackage = schemas.missingOptionalPackage(object);
    if (missingPackage) {
      skipped++;
      console.log(`skip ${name}: npm ${missingPackage} is not installed in ${nodeModules}`);
      continue;
    }
    check(name, await schemas.check(object));
  }
}

// --- The contract checkers, on broken copies of the rendered manifests -----

// Every problem checkContract finds in `objects`, as "check: problem".
function contractProblems(objects, options) {
  return checkContract(objects, muonps, options)
    .flatMap(([name, problems]) => problems.map((problem) => `${name}: ${problem}`));
}

// A deep copy of `objects` changed by `edit(find)`, find(kind, name) giving
// the copied object.
function broken(objects, edit) {
  const copy = structuredClone(objects);
  edit((kind, name) => copy.find((o) => o.kind === kind && o.metadata?.name === name));
  return copy;
}

const container = (object) => object.spec.template.spec.containers[0];
const tlsRender = renders.get(kTlsTarget);
if (tlsRender) {
  const tls = { requireTls: true };
  check('self-test: the TLS variant passes as it is', contractProblems(tlsRender, tls));
  expectProblem('a worker without --cluster_secret_file fails', contractProblems(broken(tlsRender, (find) => {
    const worker = container(find('Deployment', 'muonps-worker'));
    worker.args = worker.args.filter((arg) => !arg.startsWith('--cluster_secret_file'));
  }), tls), /muonps-worker: --cluster_secret_file .*: --cluster_secret_file is not set/);
  expectProblem('a shard without the cluster secret volume fails', contractProblems(broken(tlsRender, (find) => {
    const shard = find('StatefulSet', 'muonps-shard');
    container(shard).volumeMounts = container(shard).volumeMounts.filter((m) => m.name !== 'cluster-secret');
  }), tls), /muonps-shard: --cluster_secret_file .*is on no volume mount/);
  expectProblem('a cluster secret from another Secret fails', contractProblems(broken(tlsRender, (find) => {
    const coordinator = find('Deployment', 'muonps-coordinator');
    coordinator.spec.template.spec.volumes.find((v) => v.name === 'cluster-secret').secret.secretName = 'other';
  }), tls), /muonps-coordinator: --cluster_secret_file .*not key secret of muonps-cluster-secret/);
  expectProblem('a coordinator without --tokens_file fails', contractProblems(broken(tlsRender, (find) => {
    const coordinator = container(find('Deployment', 'muonps-coordinator'));
    coordinator.args = coordinator.args.filter((arg) => !arg.startsWith('--tokens_file'));
  }), tls), /muonps-coordinator: --tokens_file .*: --tokens_file is not set/);
  expectProblem('a --checkpoint_root off the checkpoint volume fails', contractProblems(broken(tlsRender, (find) => {
    const shard = container(find('StatefulSet', 'muonps-shard'));
    shard.args = shard.args.map((arg) => (arg.startsWith('--checkpoint_root') ? '--checkpoint_root=/var/lib/muonps' : arg));
  }), tls), /muonps-shard: --checkpoint_root .*not the checkpoint claim/);
  expectProblem('workers without --data_root fail', contractProblems(broken(tlsRender, (find) => {
    const worker = container(find('Deployment', 'muonps-worker'));
    worker.args = worker.args.filter((arg) => !arg.startsWith('--data_root'));
  }), tls), /muonps-worker: --data_root .*is not set/);
  expectProblem('no NetworkPolicy fails', contractProblems(tlsRender.filter((o) => o.kind !== 'NetworkPolicy'), tls),
    /^a NetworkPolicy: none/);
  expectProblem('a NetworkPolicy that leaves out the shards fails', contractProblems(broken(tlsRender, (find) => {
    const policy = find('NetworkPolicy', 'muonps');
    policy.spec.podSelector.matchExpressions.find((e) => e.key === 'app.kubernetes.io/component').values = ['coordinator', 'worker'];
  }), tls), /muonps-shard: NetworkPolicies .*: no NetworkPolicy selects muonps-shard/);
  expectProblem('a NetworkPolicy open to everyone fails', contractProblems(broken(tlsRender, (find) => {
    delete find('NetworkPolicy', 'muonps').spec.ingress[0].from;
  }), tls), /NetworkPolicy muonps admits port 707\d from anywhere/);
  expectProblem('a NetworkPolicy without Prometheus fails', contractProblems(broken(tlsRender, (find) => {
    const policy = find('NetworkPolicy', 'muonps');
    policy.spec.ingress = policy.spec.ingress.filter((rule) => !rule.ports?.some((p) => p.port === 'metrics'));
  }), tls), /does not admit Prometheus/);
  expectProblem('a TLS variant without MUONPS_TLS_CA fails', contractProblems(broken(tlsRender, (find) => {
    const shard = container(find('StatefulSet', 'muonps-shard'));
    shard.env = shard.env.filter((e) => e.name !== 'MUONPS_TLS_CA');
  }), tls), /muonps-shard: TLS .*MUONPS_TLS_CA is not set/);
  expectProblem('a TLS variant with gRPC probes fails', contractProblems(broken(tlsRender, (find) => {
    const worker = container(find('Deployment', 'muonps-worker'));
    delete worker.readinessProbe.tcpSocket;
    worker.readinessProbe.grpc = { port: 7072 };
  }), tls), /muonps-worker: listen port .*readinessProbe is not a TCP probe/);
  expectProblem('the TLS variant without TLS fails', contractProblems(renders.get('base') ?? [], tls),
    /muonps-coordinator: TLS .*no TLS: set MUONPS_TLS_CERT, MUONPS_TLS_KEY, MUONPS_TLS_CA/);
  expectProblem('a shard certificate without the shards\' names fails', contractProblems(broken(tlsRender, (find) => {
    find('Certificate', 'muonps-shard').spec.dnsNames = ['*.muonps-shard'];
  }), tls), /Certificate muonps-shard does not name muonps-shard-0\.muonps-shard\./);
}

for (const [target, objects] of renders) {
  const options = { requireTls: target === kTlsTarget };
  for (const [name, problems] of checkContract(objects, muonps, options)) check(`${target}: ${name}`, problems);
}

console.log(`\n${passed} passed, ${failed} failed${skipped > 0 ? `, ${skipped} skipped` : ''}`);
process.exit(failed === 0 ? 0 : 1);
