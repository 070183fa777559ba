#!/usr/bin/env node
// A ConvNet Search client in Node.js, and the example of using the gateway from a language
// other than Python: the .proto files are loaded at run time, so there is no generated code.
//
//   node client.js <dataset> [label=]<image file>...
//   CONVSEARCH_DATASET=<dataset> node client.js [label=]<image file>...
//
// Creates the dataset, ingests the files (id: the file name without its extension; label: what
// comes before "=", if anything), indexes them, searches by the first item's id and by its image,
// fetches its thumbnail, and prints a JSON summary. A gRPC error prints its code and details on
// stderr and exits 1.
//
// Environment: CONVSEARCH_GATEWAY (host:port, default 127.0.0.1:50051), CONVSEARCH_API_KEY (sent
// as `authorization: Bearer <key>`), CONVSEARCH_DATASET (then every argument is a file),
// CONVSEARCH_MODEL and CONVSEARCH_LAYER (default: the extractor's default model, indexed at its
// featured layers and searched at the last one), CONVSEARCH_PROTOS (the repository's protos/).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = process.env.CONVSEARCH_PROTOS || path.join(__dirname, '..', '..', 'protos');
const GATEWAY = process.env.CONVSEARCH_GATEWAY || '127.0.0.1:50051';
const API_KEY = process.env.CONVSEARCH_API_KEY || '';
const UNARY_DEADLINE_MS = 60_000;

// Imports resolve against the proto root, as protoc's -I does; google/protobuf/timestamp.proto
// comes with protobufjs, so no other include directory is needed.
const definition = protoLoader.loadSync('convsearch/gateway/v1/gateway.proto', {
  includeDirs: [PROTOS],
  keepCase: true, // field names as the .proto spells them: search_score, mime_type
  longs: String, // int64 (counts, Timestamp.seconds) can exceed a JS number's exact range
  enums: String, // 'INGEST_STATUS_STORED' rather than 1
  defaults: true, // unset scalars read as zero, as in other languages; `optional` fields stay absent
});
const { GatewayService } = grpc.loadPackageDefinition(definition).convsearch.gateway.v1;
const gateway = new GatewayService(GATEWAY, grpc.credentials.createInsecure());

// A fresh Metadata per call: grpc-js may modify the one it is given. (Call credentials would
// add the key for us, but grpc-js sends them only over TLS.)
function metadata() {
  const meta = new grpc.Metadata();
  if (API_KEY) meta.set('authorization', `Bearer ${API_KEY}`);
  return meta;
}

function unary(method, request) {
  const deadline = Date.now() + UNARY_DEADLINE_MS;
  return new Promise((resolve, reject) => {
    gateway[method](request, metadata(), { deadline }, (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

function isoTime(timestamp) {
  return new Date(Number(timestamp.seconds) * 1000 + Math.floor(timestamp.nanos / 1e6)).toISOString();
}

function hits(reply) {
  return reply.hits.map(({ id, label, distance }) => ({ id, label, distance }));
}

async function main() {
  const files = process.argv.slice(2);
  const dataset = process.env.CONVSEARCH_DATASET || files.shift();
  if (!dataset || files.length === 0) {
    console.error('usage: node client.js <dataset> [label=]<image file>...  (or CONVSEARCH_DATASET=<dataset>)');
    process.exit(2);
  }
  const items = files.map((arg) => {
    const at = arg.indexOf('=');
    const file = arg.slice(at + 1);
    return { id: path.parse(file).name, label: arg.slice(0, Math.max(at, 0)), image: fs.readFileSync(file) };
  });
  // No configuration means the default model; a search names exactly one layer (or none: the last).
  const model = process.env.CONVSEARCH_MODEL || '';
  const layers = process.env.CONVSEARCH_LAYER ? [process.env.CONVSEARCH_LAYER] : [];
  const configurations = model || layers.length ? [{ model, layers }] : [];
  const configuration = configurations[0] || {};

  const created = await unary('CreateDataset', { name: dataset }).catch((error) => {
    // Running again is fine: ingestion is idempotent by id (the items come back REPLACED).
    if (error.code === grpc.status.ALREADY_EXISTS) return unary('GetDataset', { name: dataset });
    throw error;
  });

  // One item a message keeps messages small; only the first needs to name the dataset. The
  // gateway answers one result per item, in order, and a bad item does not end the stream.
  const ingest = gateway.Ingest(metadata());
  items.forEach((item, i) => ingest.write({ dataset: i === 0 ? dataset : '', items: [item] }));
  ingest.end();
  const ingested = [];
  for await (const result of ingest) ingested.push({ id: result.id, status: result.status, error: result.error });

  // Images embedded by this run: 0 when run again, as vectors already stored are kept.
  let indexed = 0;
  for await (const progress of gateway.IndexDataset({ dataset, configurations }, metadata())) {
    console.error(`indexing: ${progress.done}/${progress.total} (${progress.failed} failed)`);
    if (progress.finished) indexed = Number(progress.done) - Number(progress.failed);
  }

  const first = items[0];
  const byId = await unary('Search', { dataset, configuration, item_id: first.id, k: 5 });
  const byImage = await unary('Search', { dataset, configuration, image: first.image, k: 5 });
  const image = await unary('GetImage', { dataset, item_id: first.id, thumbnail_size: 64 });

  const summary = {
    dataset,
    create_time: isoTime(created.dataset.create_time),
    ingested,
    indexed,
    collection: byId.collection,
    by_id: hits(byId),
    by_image: hits(byImage),
    image: { mime_type: image.mime_type, width: image.width, height: image.height, bytes: image.image.length },
  };
  // Set only for a labeled stored query: absent means "no score", not a score of 0.
  if (byId.search_score !== undefined) summary.search_score = byId.search_score;
  console.log(JSON.stringify(summary, null, 2));
}

main()
  .catch((error) => {
    // A gRPC error has a numeric code and the server's details; anything else (a missing file) a message.
    console.error(typeof error.code === 'number' ? `${grpc.status[error.code]}: ${error.details}` : String(error));
    process.exitCode = 1;
  })
  .finally(() => gateway.close());
