// The ConvNet Search playground: talks to the web service's JSON API (/api), draws with Plotly.
"use strict";

const PAGE_SIZE = 60;
const THUMB = 96;
const state = {
  models: [], dataset: null, collections: [], page: 0,
  query: null, // {id} for a stored item, {file} for an upload
};
const $ = (id) => document.getElementById(id);

// ---- talking to the API -------------------------------------------------------------------

class ApiError extends Error {}

// Every call says it is the page's own: another site's page cannot send this header without a CORS
// preflight, which the service never grants, so it cannot make the service index or search.
const FROM_THE_PAGE = {"X-Requested-With": "convsearch"};

async function request(path, options) {
  const response = await fetch(path, {...options, headers: {...FROM_THE_PAGE, ...options?.headers}});
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    const message = body && body.error ? body.error.message : response.statusText;
    throw new ApiError(`${message} (HTTP ${response.status})`);
  }
  return response;
}

async function api(path, options) {
  return (await request(path, options)).json();
}

// The server-sent events of a response as {event, data}: fetch, not EventSource, which cannot send
// FROM_THE_PAGE (the service sends one data line per event).
async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    const blocks = (buffered + value).split("\n\n");
    buffered = blocks.pop();
    for (const block of blocks) {
      yield Object.fromEntries(block.split("\n").map((line) => line.split(/: (.*)/s, 2)));
    }
  }
}

function datasetPath(suffix) {
  return `/api/datasets/${encodeURIComponent(state.dataset)}${suffix}`;
}

function configuration() {
  return {model: $("model").value, layer: $("layer").value, pooling: $("pooling").value, metric: $("metric").value};
}

function query(params) {
  return new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== undefined)).toString();
}

function imageUrl(id, size) {
  return datasetPath(`/image?${query({id, size: size || THUMB})}`);
}

function showError(error) {
  $("error-text").textContent = error instanceof Error ? error.message : String(error);
  $("error").hidden = false;
  if (!(error instanceof ApiError)) console.error(error);
}

function guarded(work) {
  return (...args) => Promise.resolve().then(() => work(...args)).catch(showError);
}

function element(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

// ---- datasets, models, layers -----------------------------------------------------------------

function setOptions(select, values, chosen) {
  select.replaceChildren(...values.map(([value, text]) => element("option", {value, text})));
  if (values.some(([value]) => value === chosen)) select.value = chosen;
}

function indexedLayers(model) {
  const {pooling, metric} = configuration();
  return new Set(state.collections.filter((c) => c.model === model && c.pooling === pooling && c.metric === metric
    && c.count > 0).map((c) => c.layer));
}

function fillLayers(preferred) {
  const model = state.models.find((m) => m.name === $("model").value);
  const indexed = indexedLayers($("model").value);
  const layers = model ? model.layers.map((l) => l.name) : [];
  for (const name of indexed) if (!layers.includes(name)) layers.push(name);
  const chosen = preferred && layers.includes(preferred) ? preferred
    : [...layers].reverse().find((name) => indexed.has(name)) || layers[layers.length - 1];
  setOptions($("layer"), layers.map((name) => [name, indexed.has(name) ? `${name} ✓` : name]), chosen);
  $("config-note").textContent = indexed.size ? `✓ indexed under ${configuration().pooling}/${configuration().metric}`
    : "not indexed under this pooling and metric yet: press Index";
}

function fillModels() {
  const present = new Set(state.collections.map((c) => c.model));
  const names = state.models.filter((m) => m.available || present.has(m.name)).map((m) => m.name);
  for (const name of present) if (!names.includes(name)) names.push(name);
  const current = $("model").value;
  const byCount = [...present].sort((a, b) => state.collections.filter((c) => c.model === b && c.model !== "pixels").length
    - state.collections.filter((c) => c.model === a && c.model !== "pixels").length);
  const chosen = present.has(current) ? current : byCount[0] || "efficientnet_lite0";
  setOptions($("model"), names.map((name) => [name, present.has(name) ? `${name} ✓` : name]), chosen);
}

async function loadDataset() {
  state.dataset = $("dataset").value;
  if (!state.dataset) {
    $("grid-note").textContent = "No datasets yet: ingest one with `convsearch ingest` or run `convsearch demo`.";
    return;
  }
  const found = await api(datasetPath(""));
  state.collections = found.collections;
  const used = state.collections.find((c) => c.count > 0);
  if (used) {
    $("pooling").value = used.pooling;
    $("metric").value = used.metric;
  }
  fillModels();
  fillLayers();
  state.page = 0;
  $("label-filter").value = "";
  await configurationChanged();
}

async function configurationChanged() {
  await Promise.all([loadGrid().catch(showError), loadCompare().catch(showError)]);
}

// ---- the dataset's images ------------------------------------------------------------------

async function loadGrid() {
  const grid = $("grid");
  $("grid-note").textContent = "";
  let page;
  try {
    page = await api(datasetPath(`/items?${query({...configuration(), offset: state.page * PAGE_SIZE,
      limit: PAGE_SIZE, label: $("label-filter").value})}`));
  } catch (error) {
    grid.replaceChildren();
    grid.dataset.collection = "";
    $("page-info").textContent = "";
    $("grid-note").textContent = `${error.message}. The images are listed from an indexed layer: choose one marked ✓ `
      + "or press Index.";
    return;
  }
  grid.dataset.collection = page.collection;
  const label = $("label-filter").value;
  setOptions($("label-filter"), [["", "all"], ...page.labels.map((l) => [l, l])], label);
  grid.replaceChildren(...page.items.map((item) => element("button",
    {type: "button", class: "tile", title: `${item.id} (${item.label || "no label"})`, "data-id": item.id,
      onclick: () => guarded(searchItem)(item.id)},
    element("img", {src: imageUrl(item.id), alt: item.id, loading: "lazy"}),
    element("span", {class: "caption", text: item.label || "—"}))));
  const pages = Math.max(1, Math.ceil(page.total / PAGE_SIZE));
  $("page-info").textContent = `page ${state.page + 1} of ${pages} · ${page.total} images${page.sampled ? " (a sample)" : ""}`;
  $("prev-page").disabled = state.page === 0;
  $("next-page").disabled = state.page + 1 >= pages;
}

// ---- search --------------------------------------------------------------------------------

function showQuery(source, caption) {
  $("query").replaceChildren(element("img", {src: source, alt: "query", class: "query-image"}),
    element("div", {}, element("strong", {text: "Query"}), element("br"), caption));
}

function showResults(result) {
  const score = $("score");
  if (result.search_score !== null && result.search_score !== undefined) {
    score.textContent = `Search score ${result.search_score.toFixed(2)}% · ${result.same_label_count} / `
      + `${result.scored_results} results in the same category (${result.query_label})`;
  } else {
    score.textContent = "An uploaded image has no class, so no search score.";
  }
  if (!result.pretrained) score.textContent += ` · ${result.weights === "random" ? "random" : "unknown"} weights: `
    + "these results say nothing about the model";
  $("results").replaceChildren(...result.hits.map((hit, rank) => element("button",
    {type: "button", class: `tile result ${hit.same === true ? "same" : hit.same === false ? "other" : ""}`,
      title: hit.id, "data-id": hit.id, onclick: () => guarded(searchItem)(hit.id)},
    element("img", {src: imageUrl(hit.id), alt: hit.id}),
    element("span", {class: "caption"},
      element("b", {text: `${rank + 1}. `}),
      element("span", {class: "mark", text: hit.same === true ? "✓ " : hit.same === false ? "✗ " : ""}),
      `${hit.label || "—"}`, element("br"), element("small", {text: `d = ${hit.distance.toFixed(4)}`})))));
}

async function searchItem(id) {
  state.query = {id};
  showQuery(imageUrl(id, 192), `${id}`);
  $("score").textContent = "searching …";
  const result = await api(datasetPath("/search"), {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({...configuration(), item_id: id, k: 15})});
  showResults(result);
  await loadQueryChart().catch(showError);
}

async function searchFile(file) {
  if (!file) return;
  if (!state.dataset) throw new Error("choose a dataset first");
  state.query = {file};
  showQuery(URL.createObjectURL(file), file.name);
  $("score").textContent = "searching …";
  const form = new FormData();
  form.append("file", file);
  for (const [name, value] of Object.entries(configuration())) form.append(name, value);
  form.append("k", "15");
  const result = await api(datasetPath("/search/image"), {method: "POST", body: form});
  showResults(result);
  Plotly.purge($("chart-query"));
}

// ---- comparing configurations ----------------------------------------------------------------

function byDepth(scores) {
  // The model's own layer order where it is known (the baseline's layers have no parameters), else by depth.
  const position = (score) => {
    const model = state.models.find((m) => m.name === score.model);
    const index = model ? model.layers.findIndex((layer) => layer.name === score.layer) : -1;
    return index >= 0 ? index : model ? model.layers.length : 0;
  };
  return [...scores].sort((a, b) => position(a) - position(b) || a.parameter_count - b.parameter_count);
}

function barsPerModel(scores, value, category = (s) => s.layer) {
  const models = [...new Set(scores.map((s) => s.model))];
  return models.map((model) => {
    const rows = byDepth(scores.filter((s) => s.model === model));
    const values = rows.map(value);
    const best = values.indexOf(Math.max(...values));
    return {type: "bar", name: rows[0].baseline ? `${model} (baseline)` : model,
      x: [rows.map(() => model), rows.map(category)], y: values,
      marker: {line: {color: "#1d2430", width: values.map((_, i) => (i === best ? 3 : 0))}},
      hovertemplate: `${model} %{x[1]}: %{y:.2f}%<extra></extra>`};
  });
}

function chartLayout(title) {
  return {title: {text: title, font: {size: 14}}, barmode: "group", margin: {t: 40, r: 10, b: 190, l: 50},
    yaxis: {title: {text: "search score (%)"}, range: [0, 100]}, showlegend: false, height: 460};
}

async function loadCompare() {
  const found = await api(datasetPath("/compare"));
  const {pooling, metric} = configuration();
  const scores = found.ranked.filter((s) => s.pooling === pooling && s.metric === metric);
  if (!scores.length) {
    Plotly.purge($("chart-layers"));
    $("compare-note").textContent = `No evaluation under ${pooling}/${metric} yet: press Evaluate.`;
    return;
  }
  const best = scores.reduce((a, b) => (b.mean_score > a.mean_score ? b : a));
  $("compare-note").textContent = `Best: ${best.model} ${best.layer} (${best.mean_score.toFixed(2)}%); `
    + "each model's best layer is outlined"
    + (found.stale.length ? ` · not current, evaluate again: ${found.stale.join(", ")}` : "");
  await Plotly.react($("chart-layers"), barsPerModel(scores, (s) => s.mean_score),
    chartLayout(`${state.dataset}: mean search score per layer (${pooling}, ${metric})`), {responsive: true});
}

async function loadQueryChart() {
  if (!state.query || !state.query.id) return;
  const found = await api(datasetPath(`/compare?${query({item_id: state.query.id})}`));
  const scores = found.ranked.filter((s) => s.collection in found.item_scores);
  if (!scores.length) {
    Plotly.purge($("chart-query"));
    return;
  }
  const traces = barsPerModel(scores, (s) => found.item_scores[s.collection],
    (s) => `${s.layer} ${s.pooling}/${s.metric}`);
  await Plotly.react($("chart-query"), traces,
    chartLayout(`${state.query.id}: its search score under every evaluated configuration`), {responsive: true});
}

// ---- the map -------------------------------------------------------------------------------

async function loadMap() {
  const method = $("map-method").value;
  $("map-note").textContent = method === "umap" ? "UMAP takes a while the first time …" : "";
  const found = await api(datasetPath(`/projection?${query({...configuration(), method, max_points: 2000})}`));
  const labels = [...new Set(found.points.map((p) => p.label))].sort();
  const traces = labels.map((label) => {
    const points = found.points.filter((p) => p.label === label);
    return {type: "scatter", mode: "markers", name: label || "no label", x: points.map((p) => p.x),
      y: points.map((p) => p.y), customdata: points.map((p) => p.id), marker: {size: 7, opacity: 0.85},
      hovertemplate: "%{customdata}<extra>%{fullData.name}</extra>"};
  });
  $("map-note").textContent = `${found.points.length} points of ${found.collection} (${method.toUpperCase()})`
    + (found.sampled ? `, a sample of ${found.total}` : "") + " · hover for the image, click to search with it";
  const map = $("map");
  await Plotly.react(map, traces, {margin: {t: 36, r: 10, b: 30, l: 30}, height: 520, legend: {orientation: "v"},
    xaxis: {zeroline: false}, yaxis: {zeroline: false}}, {responsive: true});
  for (const name of ["plotly_hover", "plotly_unhover", "plotly_click"]) map.removeAllListeners(name);
  map.on("plotly_hover", (event) => {
    const point = event.points[0];
    const mouse = event.event || {pageX: 0, pageY: 0};
    const thumb = $("hover-thumb");
    thumb.src = imageUrl(point.customdata);
    thumb.style.left = `${mouse.pageX + 12}px`;
    thumb.style.top = `${mouse.pageY + 12}px`;
    thumb.hidden = false;
  });
  map.on("plotly_unhover", () => { $("hover-thumb").hidden = true; });
  map.on("plotly_click", (event) => guarded(searchItem)(event.points[0].customdata));
}

// ---- activation maps -----------------------------------------------------------------------

async function loadInspection() {
  if (!state.query) throw new Error("choose a query first: click an image or upload one");
  const {model, layer} = configuration();
  $("inspect-note").textContent = "computing …";
  let found;
  if (state.query.id) {
    found = await api(datasetPath(`/inspect?${query({id: state.query.id, model, layer})}`));
  } else {
    const form = new FormData();
    form.append("file", state.query.file);
    form.append("model", model);
    form.append("layer", layer);
    found = await api("/api/inspect", {method: "POST", body: form});
  }
  $("inspect-note").textContent = `${found.model} ${found.layer}: output ${found.output_shape.join(" × ")}, `
    + `${found.parameter_count.toLocaleString()} parameters up to here`;
  $("maps").replaceChildren(...found.channels.map((c) => element("figure", {class: "tile"},
    element("img", {src: c.png, alt: `channel ${c.channel}`}),
    element("figcaption", {text: `channel ${c.channel} · mean ${c.mean_activation.toFixed(3)}`}))));
}

// ---- jobs: indexing and evaluation, progress streamed ----------------------------------------

function showProgress(bar, text, step) {
  bar.max = Math.max(1, step.total);
  bar.value = step.done;
  text.textContent = `${step.phase ? step.phase + " " : ""}${step.done} / ${step.total}`
    + (step.images_per_second ? ` · ${step.images_per_second.toFixed(1)} img/s` : "")
    + (step.failed ? ` · ${step.failed} failed` : "");
}

// A job's progress events into bar and text; resolves with the last step, rejects with its failure.
async function followJob(path, bar, text) {
  for await (const {event, data} of serverEvents(await request(path))) {
    const step = JSON.parse(data);
    if (event === "done") return step;
    if (event === "failure") throw new ApiError(`${step.error.message} (HTTP ${step.status})`);
    showProgress(bar, text, step);
  }
  throw new Error("the stream ended before the job did");
}

function startJob(title, path, onDone) {
  const bar = element("progress", {max: "1", value: "0"});
  const text = element("span", {class: "job-text", text: "starting …"});
  const job = element("div", {class: "job"}, element("strong", {text: title}), bar, text);
  $("jobs").append(job);
  const finish = (message) => {
    text.textContent = message;
    job.classList.add("finished");
    setTimeout(() => job.remove(), 8000);
  };
  followJob(path, bar, text).then(
    (last) => { finish("done"); return onDone(last); },
    (error) => {
      finish("failed");
      throw error instanceof ApiError ? new ApiError(`${title}: ${error.message}`)
        : new Error(`${title}: lost the connection to the web service`);
    }).catch(showError);
}

function indexDataset() {
  const {model, pooling, metric} = configuration();
  startJob(`Indexing ${state.dataset} with ${model}`, datasetPath(`/index/events?${query({model, pooling, metric})}`),
    async () => {
      const layer = $("layer").value;
      state.collections = (await api(datasetPath(""))).collections;
      fillModels();
      fillLayers(layer);
      await configurationChanged();
    });
}

function evaluateDataset() {
  const {model, metric} = configuration();
  const models = $("with-baseline").checked && model !== "pixels" ? `${model},pixels` : model;
  startJob(`Evaluating ${models} on ${state.dataset}`, datasetPath(`/evaluate/events?${query({models, metrics: metric})}`),
    async () => {
      state.collections = (await api(datasetPath(""))).collections;
      fillModels();
      fillLayers($("layer").value);
      await loadCompare();
      await loadQueryChart();
    });
}

// ---- wiring --------------------------------------------------------------------------------

function wire() {
  $("error-close").addEventListener("click", () => { $("error").hidden = true; });
  $("dataset").addEventListener("change", guarded(loadDataset));
  $("model").addEventListener("change", guarded(() => { fillLayers(); state.page = 0; return configurationChanged(); }));
  $("layer").addEventListener("change", guarded(() => loadGrid()));
  for (const id of ["pooling", "metric"]) {
    $(id).addEventListener("change", guarded(() => { fillLayers($("layer").value); return configurationChanged(); }));
  }
  $("label-filter").addEventListener("change", guarded(() => { state.page = 0; return loadGrid(); }));
  $("prev-page").addEventListener("click", guarded(() => { state.page -= 1; return loadGrid(); }));
  $("next-page").addEventListener("click", guarded(() => { state.page += 1; return loadGrid(); }));
  $("upload").addEventListener("change", guarded((event) => searchFile(event.target.files[0])));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", guarded((event) => {
    event.preventDefault();
    drop.classList.remove("over");
    return searchFile(event.dataTransfer.files[0]);
  }));
  $("index-button").addEventListener("click", guarded(indexDataset));
  $("evaluate-button").addEventListener("click", guarded(evaluateDataset));
  $("map-button").addEventListener("click", guarded(loadMap));
  $("inspect-button").addEventListener("click", guarded(loadInspection));
}

async function start() {
  wire();
  const [models, datasets] = await Promise.all([api("/api/models"), api("/api/datasets")]);
  state.models = models;
  const names = datasets.map((d) => d.name);
  const chosen = names.includes("fashion200") ? "fashion200" : names[0] || "";
  setOptions($("dataset"), datasets.map((d) => [d.name, `${d.name} (${d.item_count})`]), chosen);
  await loadDataset();
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", guarded(start));
