// The ConvNet Search playground: talks to the web service's JSON API (/api), draws with Plotly.
"use strict";

const PAGE_SIZE = 60;
const THUMB = 96;
const state = {
  models: [], modelsListed: false, datasets: [], dataset: null, itemCount: 0, collections: [], page: 0, jobs: 0,
  query: null, // {id} for a stored item, {file} for an upload
};
const QUERY_PROMPT = "Click an image of the dataset, or upload one.";
const ALL = ""; // the class filter's values: ALL, UNLABELED, or LABELED + a label
const UNLABELED = "!";
const LABELED = "=";
const $ = (id) => document.getElementById(id);

// ---- talking to the API -------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, reason) {
    super(message);
    this.reason = reason || "";
  }
}

// Each panel's request in flight: a newer one aborts it, so a slow answer never shows under a later
// question (another image clicked, another dataset chosen).
const inFlight = {};

function fresh(panel) {
  inFlight[panel]?.abort();
  inFlight[panel] = new AbortController();
  return inFlight[panel].signal;
}

function abortAll() {
  for (const panel of Object.keys(inFlight)) inFlight[panel].abort();
}

// Every call says it is the page's own: another site's page cannot send this header without a CORS
// preflight, which the service never grants, so it cannot make the service index or search.
const FROM_THE_PAGE = {"X-Requested-With": "convsearch"};

async function request(path, options) {
  const response = await fetch(path, {...options, headers: {...FROM_THE_PAGE, ...options?.headers}});
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    const message = body && body.error ? body.error.message : response.statusText;
    throw new ApiError(`${message} (HTTP ${response.status})`, body && body.error ? body.error.reason : "");
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
  if (error?.name === "AbortError") return; // a question asked again since: not a failure
  $("error-text").textContent = error instanceof Error ? error.message : String(error);
  $("error").hidden = false;
  if (error?.reason === "DATASET_NOT_FOUND") guarded(datasetGone)();
  else if (!(error instanceof ApiError)) console.error(error);
}

// Plotly draws titles, names, tick labels and hover text as HTML: ids and labels go in as text.
function escapeHtml(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
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

// The model's collections under the chosen pooling and metric, by layer.
function layerCollections(model) {
  const {pooling, metric} = configuration();
  return new Map(state.collections.filter((c) => c.model === model && c.pooling === pooling && c.metric === metric
    && c.count > 0).map((c) => [c.layer, c]));
}

function complete(collection) {
  return collection.count >= state.itemCount;
}

function layerText(name, collection) {
  if (!collection) return name;
  return complete(collection) ? `${name} ✓` : `${name} (partial)`;
}

function fillLayers(preferred) {
  const model = state.models.find((m) => m.name === $("model").value);
  const found = layerCollections($("model").value);
  const layers = model ? model.layers.map((l) => l.name) : [];
  for (const name of found.keys()) if (!layers.includes(name)) layers.push(name);
  const chosen = preferred && layers.includes(preferred) ? preferred
    : [...layers].reverse().find((name) => found.has(name) && complete(found.get(name)))
      || [...layers].reverse().find((name) => found.has(name)) || layers[layers.length - 1];
  setOptions($("layer"), layers.map((name) => [name, layerText(name, found.get(name))]), chosen);
  describeLayer();
}

// Whether the chosen layer is indexed under the chosen pooling and metric: wholly, partly or not.
function describeLayer() {
  const {model, layer, pooling, metric} = configuration();
  const found = layerCollections(model).get(layer);
  $("config-note").textContent = !found ? `not indexed under ${pooling}/${metric} yet: press Index`
    : complete(found) ? `✓ indexed under ${pooling}/${metric}`
      : `partial: ${found.count} of ${state.itemCount} images indexed — press Index to finish`;
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

// The page's controls can show a collection only under a pooling and a metric they offer.
function representable(collection) {
  return [...$("pooling").options].some((o) => o.value === collection.pooling)
    && [...$("metric").options].some((o) => o.value === collection.metric);
}

async function loadCollections() {
  const found = await api(datasetPath(""));
  state.itemCount = found.item_count;
  state.collections = found.collections.filter(representable);
  if (!state.modelsListed) state.models = modelsOfCollections();
}

// Without the model catalogue (the extractor down): the models and layers the dataset has indexed.
function modelsOfCollections() {
  const models = [...new Set(state.collections.map((c) => c.model))];
  return models.map((name) => ({name, available: true,
    layers: [...new Set(state.collections.filter((c) => c.model === name).map((c) => c.layer))].map((l) => ({name: l}))}));
}

function updateButtons() {
  const none = !state.dataset;
  for (const id of ["index-button", "evaluate-button"]) $(id).disabled = none || state.jobs > 0;
  $("map-button").disabled = none;
}

async function loadDataset() {
  abortAll();
  clearQuery();
  clearDrawings();
  Plotly.purge($("chart-layers"));
  $("compare-note").textContent = "";
  state.dataset = $("dataset").value;
  state.page = 0;
  setOptions($("label-filter"), [[ALL, "all"]], ALL);
  updateButtons();
  if (!state.dataset) {
    $("grid").replaceChildren();
    $("grid-note").textContent = "No datasets yet: ingest one with `convsearch ingest` or run `convsearch demo`.";
    return;
  }
  await loadCollections();
  const used = state.collections.find((c) => c.count > 0);
  if (used) {
    $("pooling").value = used.pooling;
    $("metric").value = used.metric;
  }
  fillModels();
  fillLayers();
  await configurationChanged();
}

// What was shown for another configuration goes; the query is asked again under the new one (where
// that fails, e.g. a layer not indexed, the score line says why).
async function configurationChanged() {
  clearDrawings();
  const again = searchAgain().catch((error) => {
    if (error.name !== "AbortError") $("score").textContent = error.message;
  });
  await Promise.all([loadGrid().catch(showError), loadCompare().catch(showError), again]);
}

async function loadDatasets() {
  state.datasets = await api("/api/datasets");
  const names = state.datasets.map((d) => d.name);
  const current = $("dataset").value;
  const chosen = names.includes(current) ? current : names.includes("fashion200") ? "fashion200" : names[0] || "";
  setOptions($("dataset"), state.datasets.map((d) => [d.name, `${d.name} (${d.item_count})`]), chosen);
}

// The dataset was deleted meanwhile: list the datasets again, and show another one.
async function datasetGone() {
  const before = state.dataset;
  await loadDatasets();
  if ($("dataset").value !== before) await loadDataset();
}

// ---- the dataset's images ------------------------------------------------------------------

function emptyGrid(note) {
  $("grid").replaceChildren();
  $("grid").dataset.collection = "";
  $("page-info").textContent = "";
  $("grid-note").textContent = note;
  setOptions($("label-filter"), [[ALL, "all"]], ALL);
  $("prev-page").disabled = true;
  $("next-page").disabled = true;
}

function labelFilter() {
  const chosen = $("label-filter").value;
  return chosen === UNLABELED ? {unlabeled: "true"} : chosen.startsWith(LABELED) ? {label: chosen.slice(1)} : {};
}

function labelOptions(labels) {
  return [[ALL, "all"], ...labels.map((l) => (l === "" ? [UNLABELED, "(no label)"] : [LABELED + l, l]))];
}

async function loadGrid() {
  const signal = fresh("grid");
  $("grid-note").textContent = "";
  if (state.itemCount === 0) {
    emptyGrid("This dataset has no images yet: ingest some with `convsearch ingest`.");
    return;
  }
  let page;
  try {
    page = await api(datasetPath(`/items?${query({...configuration(), offset: state.page * PAGE_SIZE,
      limit: PAGE_SIZE, ...labelFilter()})}`), {signal});
  } catch (error) {
    if (signal.aborted) return;
    emptyGrid(`${error.message}. The images are listed from an indexed layer: choose one marked ✓ or press Index.`);
    if (error.reason === "DATASET_NOT_FOUND") throw error;
    return;
  }
  const filter = $("label-filter").value;
  setOptions($("label-filter"), labelOptions(page.labels), filter);
  if ($("label-filter").value !== filter) { // another layer has none of the class: all its images
    state.page = 0;
    return loadGrid();
  }
  const pages = Math.max(1, Math.ceil(page.total / PAGE_SIZE));
  if (state.page >= pages) { // another layer (or class) holds fewer images: its last page
    state.page = pages - 1;
    return loadGrid();
  }
  const grid = $("grid");
  grid.dataset.collection = page.collection;
  grid.replaceChildren(...page.items.map((item) => element("button",
    {type: "button", class: "tile", title: `${item.id} (${item.label || "no label"})`, "data-id": item.id,
      onclick: () => guarded(searchItem)(item.id)},
    element("img", {src: imageUrl(item.id), alt: item.id, loading: "lazy"}),
    element("span", {class: "caption", text: item.label || "—"}))));
  $("page-info").textContent = `page ${state.page + 1} of ${pages} · ${page.total} images${page.sampled ? " (a sample)" : ""}`;
  $("prev-page").disabled = state.page === 0;
  $("next-page").disabled = state.page + 1 >= pages;
}

// ---- search --------------------------------------------------------------------------------

function showQuery(source, caption, alt) {
  $("query").replaceChildren(element("img", {src: source, alt, class: "query-image"}),
    element("div", {}, element("strong", {text: "Query"}), element("br"), caption));
}

function clearResults(status) {
  $("score").textContent = status;
  $("results").replaceChildren();
  $("results-collection").textContent = "";
  Plotly.purge($("chart-query"));
}

function clearQuery() {
  inFlight.search?.abort();
  state.query = null;
  $("query").replaceChildren(element("p", {class: "note", text: QUERY_PROMPT}));
  clearResults("");
}

function scoreText(result) {
  if (result.search_score !== null && result.search_score !== undefined) {
    return `Search score ${result.search_score.toFixed(2)}% · ${result.same_label_count} / `
      + `${result.scored_results} results in the same category (${result.query_label})`;
  }
  return state.query.file ? "An uploaded image has no class, so no search score."
    : "This image has no label, so no search score.";
}

function showResults(result) {
  const score = $("score");
  score.textContent = scoreText(result);
  $("results-collection").textContent = `Results from ${result.collection}`;
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

// Asks ask(signal) for the query's results and shows them unless another search began meanwhile;
// on a failure no results stay, nor an upload that failed.
async function search(query, ask) {
  const signal = fresh("search");
  state.query = query;
  clearResults("searching …");
  clearMaps();
  try {
    const result = await ask(signal);
    if (!signal.aborted) showResults(result);
  } catch (error) {
    if (!signal.aborted && query.file) clearQuery();
    else if (!signal.aborted) clearResults("");
    throw error;
  }
}

async function searchItem(id) {
  showQuery(imageUrl(id, 192), `${id}`, `query: ${id}`);
  await search({id}, (signal) => api(datasetPath("/search"), {method: "POST", signal,
    headers: {"Content-Type": "application/json"}, body: JSON.stringify({...configuration(), item_id: id, k: 15})}));
  if (state.query?.id === id) await loadQueryChart().catch(showError);
}

async function searchFile(file) {
  if (!file) return;
  if (!state.dataset) throw new Error("choose a dataset first");
  showQuery(URL.createObjectURL(file), file.name, `uploaded query: ${file.name}`);
  const form = new FormData();
  form.append("file", file);
  for (const [name, value] of Object.entries(configuration())) form.append(name, value);
  form.append("k", "15");
  await search({file}, (signal) => api(datasetPath("/search/image"), {method: "POST", body: form, signal}));
}

async function searchAgain() {
  if (state.query?.id) await searchItem(state.query.id);
  else if (state.query?.file) await searchFile(state.query.file);
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
    const name = escapeHtml(model);
    return {type: "bar", name: rows[0].baseline ? `${name} (baseline)` : name,
      x: [rows.map(() => name), rows.map((s) => escapeHtml(category(s)))], y: values,
      marker: {line: {color: "#1d2430", width: values.map((_, i) => (i === best ? 3 : 0))}},
      hovertemplate: `${name} %{x[1]}: %{y:.2f}%<extra></extra>`};
  });
}

function chartLayout(title) {
  return {title: {text: title, font: {size: 14}}, barmode: "group", margin: {t: 40, r: 10, b: 190, l: 50},
    yaxis: {title: {text: "search score (%)"}, range: [0, 100]}, showlegend: false, height: 460};
}

function staleNote(stale) {
  return stale.length ? ` · not current, evaluate again: ${stale.join(", ")}` : "";
}

async function loadCompare() {
  const signal = fresh("compare");
  const found = await api(datasetPath("/compare"), {signal});
  if (signal.aborted) return;
  const {pooling, metric} = configuration();
  const scores = found.ranked.filter((s) => s.pooling === pooling && s.metric === metric);
  if (!scores.length) {
    Plotly.purge($("chart-layers"));
    $("compare-note").textContent = found.stale.length ? `No current evaluation: ${staleNote(found.stale).slice(3)}`
      : `No evaluation under ${pooling}/${metric} yet: press Evaluate.`;
    return;
  }
  const best = scores.reduce((a, b) => (b.mean_score > a.mean_score ? b : a));
  $("compare-note").textContent = `Best: ${best.model} ${best.layer} (${best.mean_score.toFixed(2)}%); `
    + "each model's best layer is outlined" + staleNote(found.stale);
  await Plotly.react($("chart-layers"), barsPerModel(scores, (s) => s.mean_score),
    chartLayout(escapeHtml(`${state.dataset}: mean search score per layer (${pooling}, ${metric})`)), {responsive: true});
}

async function loadQueryChart() {
  const signal = fresh("queryChart");
  if (!state.query || !state.query.id) return;
  const id = state.query.id;
  const found = await api(datasetPath(`/compare?${query({item_id: id})}`), {signal}).catch((error) => {
    if (error.reason === "ITEM_NOT_SCORED") return {ranked: [], item_scores: {}}; // no evaluation has it yet
    throw error;
  });
  const scores = found.ranked.filter((s) => s.collection in found.item_scores);
  if (signal.aborted || state.query?.id !== id) return;
  if (!scores.length) {
    Plotly.purge($("chart-query"));
    return;
  }
  const traces = barsPerModel(scores, (s) => found.item_scores[s.collection],
    (s) => `${s.layer} ${s.pooling}/${s.metric}`);
  await Plotly.react($("chart-query"), traces,
    chartLayout(escapeHtml(`${id}: its search score under every evaluated configuration`)), {responsive: true});
}

// ---- the map -------------------------------------------------------------------------------

// The map and the activation maps, drawn for one configuration and query.
function clearDrawings() {
  inFlight.map?.abort();
  Plotly.purge($("map"));
  $("map-note").textContent = "";
  clearMaps();
}

// The activation maps are the query's: another query, configuration or dataset clears them.
function clearMaps() {
  inFlight.inspect?.abort();
  $("maps").replaceChildren();
  $("inspect-note").textContent = "";
}

function mapTraces(points) {
  const labels = [...new Set(points.map((p) => p.label))].sort();
  return labels.map((label) => {
    const chosen = points.filter((p) => p.label === label);
    return {type: "scatter", mode: "markers", name: label ? escapeHtml(label) : "no label", x: chosen.map((p) => p.x),
      y: chosen.map((p) => p.y), customdata: chosen.map((p) => p.id), text: chosen.map((p) => escapeHtml(p.id)),
      marker: {size: 7, opacity: 0.85}, hovertemplate: "%{text}<extra>%{fullData.name}</extra>"};
  });
}

async function loadMap() {
  const signal = fresh("map");
  const method = $("map-method").value;
  $("map-note").textContent = method === "umap" ? "UMAP takes a while the first time …" : "";
  let found;
  try {
    found = await api(datasetPath(`/projection?${query({...configuration(), method, max_points: 2000})}`), {signal});
  } catch (error) {
    if (!signal.aborted) clearDrawings();
    throw error;
  }
  if (signal.aborted) return;
  const traces = mapTraces(found.points);
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

function askInspection(signal) {
  const {model, layer} = configuration();
  if (state.query.id) return api(datasetPath(`/inspect?${query({id: state.query.id, model, layer})}`), {signal});
  const form = new FormData();
  form.append("file", state.query.file);
  form.append("model", model);
  form.append("layer", layer);
  return api("/api/inspect", {method: "POST", body: form, signal});
}

async function loadInspection() {
  if (!state.query) throw new Error("choose a query first: click an image or upload one");
  const signal = fresh("inspect");
  $("maps").replaceChildren();
  $("inspect-note").textContent = "computing …";
  let found;
  try {
    found = await askInspection(signal);
  } catch (error) {
    if (!signal.aborted) $("inspect-note").textContent = "";
    throw error;
  }
  if (signal.aborted) return;
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

// Screen readers hear a job start and end, not each of its steps.
function announce(message) {
  $("jobs-status").textContent = message;
}

function jobRunning(change) {
  state.jobs += change;
  updateButtons();
}

function startJob(title, path, onDone) {
  const bar = element("progress", {max: "1", value: "0", "aria-label": title});
  const text = element("span", {class: "job-text", text: "starting …"});
  const job = element("div", {class: "job"}, element("strong", {text: title}), bar, text);
  $("jobs").append(job);
  announce(`${title}: started`);
  jobRunning(1);
  const finish = (message) => {
    jobRunning(-1);
    text.textContent = message;
    announce(`${title}: ${message}`);
    job.classList.add("finished");
    setTimeout(() => job.remove(), 8000);
  };
  followJob(path, bar, text).then(
    (last) => { finish("done"); return onDone(last); },
    (error) => {
      finish("failed");
      throw error instanceof ApiError ? new ApiError(`${title}: ${error.message}`, error.reason)
        : new Error(`${title}: lost the connection to the web service`);
    }).catch(showError);
}

// After a job: the datasets' counts and the dataset's collections as they are now.
async function refreshAfterJob(dataset) {
  await loadDatasets();
  if (state.dataset !== dataset) return false;
  const layer = $("layer").value;
  await loadCollections();
  fillModels();
  fillLayers(layer);
  return true;
}

function indexDataset() {
  const {model, pooling, metric} = configuration();
  const dataset = state.dataset;
  startJob(`Indexing ${dataset} with ${model}`, datasetPath(`/index/events?${query({model, pooling, metric})}`),
    async () => { if (await refreshAfterJob(dataset)) await configurationChanged(); });
}

function evaluateDataset() {
  const {model, pooling, metric} = configuration();
  const dataset = state.dataset;
  const models = $("with-baseline").checked && model !== "pixels" ? `${model},pixels` : model;
  startJob(`Evaluating ${models} on ${dataset}`,
    datasetPath(`/evaluate/events?${query({models, pooling, metrics: metric})}`),
    async () => {
      if (!await refreshAfterJob(dataset)) return;
      await loadCompare();
      await loadQueryChart();
    });
}

// ---- wiring --------------------------------------------------------------------------------

function wire() {
  $("error-close").addEventListener("click", () => { $("error").hidden = true; });
  $("dataset").addEventListener("change", guarded(loadDataset));
  $("model").addEventListener("change", guarded(() => { fillLayers(); state.page = 0; return configurationChanged(); }));
  $("layer").addEventListener("change", guarded(() => { describeLayer(); return configurationChanged(); }));
  for (const id of ["pooling", "metric"]) {
    $(id).addEventListener("change", guarded(() => { fillLayers($("layer").value); return configurationChanged(); }));
  }
  $("label-filter").addEventListener("change", guarded(() => { state.page = 0; return loadGrid(); }));
  $("prev-page").addEventListener("click", guarded(() => { state.page -= 1; return loadGrid(); }));
  $("next-page").addEventListener("click", guarded(() => { state.page += 1; return loadGrid(); }));
  $("upload").addEventListener("change", guarded((event) => {
    const file = event.target.files[0];
    event.target.value = ""; // choosing the same file again is a change too
    return searchFile(file);
  }));
  const drop = $("drop");
  drop.addEventListener("keydown", (event) => {
    if (event.target !== drop || (event.key !== "Enter" && event.key !== " ")) return;
    event.preventDefault();
    $("upload").click();
  });
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

// The model catalogue (from the extractor); without it, the page goes on with the dataset's own.
async function loadModels() {
  try {
    state.models = await api("/api/models");
    state.modelsListed = true;
  } catch (error) {
    showError(new ApiError(`The models could not be listed: ${error.message}. Showing the models and layers `
      + "the dataset has indexed.", error.reason));
  }
}

async function start() {
  wire();
  await Promise.all([loadModels(), loadDatasets()]);
  await loadDataset();
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", guarded(start));
