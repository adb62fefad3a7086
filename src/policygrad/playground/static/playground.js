// The playground page: a form that sends its values to the server as they are typed (the server validates and
// computes everything), and canvas charts of what comes back. No library, no build step.
"use strict";

(() => {
  const COLORS = { none: "#c0392b", mean: "#e08a1e", loo: "#2060c0", group: "#8e44ad", grpo: "#2a9d5c" };
  const SPARE_COLORS = ["#16a085", "#7f8c8d", "#d35400"];
  const FIELDS = ["noise", "lr", "samples", "baseline", "baseline_decay", "entropy_coef", "epochs", "clip_eps", "seed"];
  const HISTORY = 2000; // steps kept for the charts
  const SMOOTH = 20; // steps in the moving average of the noise chart
  const EXACT = "#1d2330";

  const el = (id) => document.getElementById(id);
  const page = {
    options: null, // GET /api/options
    session: null, // id
    generation: 0, // of the session's last reset; frames of an older one are dropped
    settings: null, // as the server holds them
    state: null, // the learner now
    record: null, // the last step
    history: freshHistory(),
    stream: null, // EventSource of a run
    timer: null, // pending settings send
    queue: Promise.resolve(), // requests that change the learner, in order
  };

  function freshHistory() {
    return { expected: [], errors: {}, kl: [], clip: [] };
  }

  // ---------------------------------------------------------------- talking to the server

  async function api(method, path, body) {
    const init = { method, headers: {} };
    if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (_) {
      throw Object.assign(new Error("cannot reach the playground server: is `policygrad playground` still running?"), {
        field: "",
      });
    }
    let data;
    try {
      data = await response.json();
    } catch (_) {
      data = { error: `the server answered ${response.status} without a message` };
    }
    if (!response.ok) throw Object.assign(new Error(data.error || `error ${response.status}`), { field: data.field });
    return data;
  }

  function sessionPath(action) {
    return `/api/sessions/${encodeURIComponent(page.session)}${action ? "/" + action : ""}`;
  }

  // one request after another, so that answers are applied in the order the reader acted
  function enqueue(task) {
    const next = page.queue.then(task).catch((err) => showMessage(err.message, err.field));
    page.queue = next;
    return next;
  }

  function formSettings() {
    const settings = { means: [...document.querySelectorAll("#arms input")].map((input) => input.value) };
    for (const name of FIELDS) settings[name] = el(name).value;
    return settings;
  }

  function scheduleSettings() {
    clearTimeout(page.timer);
    page.timer = setTimeout(sendSettings, 350);
  }

  function sendSettings() {
    clearTimeout(page.timer);
    page.timer = null;
    const settings = formSettings();
    return enqueue(async () => {
      const data = await api("POST", sessionPath("settings"), settings);
      clearMessage();
      page.settings = data.settings;
      if (data.reset) page.history = freshHistory();
      take([], data.state);
    });
  }

  function flushSettings() {
    if (page.timer !== null) sendSettings();
    return page.queue;
  }

  async function step() {
    await flushSettings();
    await enqueue(async () => {
      const data = await api("POST", sessionPath("step"), { steps: 1 });
      take(data.records, data.state);
    });
  }

  async function run() {
    await flushSettings();
    stopStream();
    const rate = encodeURIComponent(el("rate").value);
    const stream = new EventSource(sessionPath(`run?rate=${rate}`));
    page.stream = stream;
    let frames = 0;
    setRunning(true);
    stream.addEventListener("frame", (event) => {
      frames += 1;
      const data = JSON.parse(event.data);
      if (data.state.generation === page.generation) take(data.records, data.state);
    });
    stream.addEventListener("failed", (event) => {
      const data = JSON.parse(event.data);
      showMessage(data.error, data.field);
      stopStream();
    });
    stream.addEventListener("done", () => stopStream());
    stream.onerror = () => {
      // EventSource would reconnect by itself; a run that ends or fails is over
      if (page.stream === stream && frames === 0) showMessage("the run could not start: reload the page", "");
      if (page.stream === stream) stopStream();
    };
  }

  function stopStream() {
    if (page.stream) page.stream.close();
    page.stream = null;
    setRunning(false);
  }

  function pause() {
    stopStream();
    return enqueue(async () => take([], (await api("POST", sessionPath("pause"))).state));
  }

  async function reset() {
    stopStream();
    await flushSettings();
    await enqueue(async () => {
      const data = await api("POST", sessionPath("reset"));
      page.history = freshHistory();
      page.record = null;
      take([], data.state);
    });
  }

  function setRunning(running) {
    el("run").disabled = running;
    el("step").disabled = running;
    el("pause").disabled = !running;
  }

  // ---------------------------------------------------------------- the form

  function showMessage(text, field) {
    const box = el("message");
    box.textContent = text;
    box.hidden = false;
    for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    const arm = /^means\[(\d+)\]$/.exec(field || "");
    const target = arm ? el(`mean-${arm[1]}`) : field ? el(field) : null;
    if (target) target.setAttribute("aria-invalid", "true");
  }

  function clearMessage() {
    el("message").hidden = true;
    el("message").textContent = "";
    for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  }

  function armRow(value) {
    const row = document.createElement("tr");
    const label = document.createElement("td");
    const cell = document.createElement("td");
    const input = document.createElement("input");
    input.inputMode = "decimal";
    input.autocomplete = "off";
    input.value = String(value);
    input.addEventListener("input", scheduleSettings);
    input.addEventListener("change", sendSettings);
    cell.append(input);
    const removeCell = document.createElement("td");
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "\u00d7";
    remove.addEventListener("click", () => {
      row.remove();
      numberArms();
      sendSettings();
    });
    removeCell.append(remove);
    row.append(label, cell, removeCell);
    return row;
  }

  function numberArms() {
    document.querySelectorAll("#arms tbody tr").forEach((row, k) => {
      row.cells[0].textContent = String(k);
      const input = row.querySelector("input");
      input.id = `mean-${k}`;
      input.setAttribute("aria-label", `mean reward of arm ${k}`);
      row.querySelector("button").setAttribute("aria-label", `remove arm ${k}`);
    });
  }

  function fillForm(settings) {
    const body = document.querySelector("#arms tbody");
    body.replaceChildren(...settings.means.map(armRow));
    numberArms();
    for (const name of FIELDS) el(name).value = String(settings[name]);
  }

  // ---------------------------------------------------------------- what comes back

  function take(records, state) {
    const history = page.history;
    for (const record of records) {
      history.expected.push(record.expected_reward);
      for (const [name, error] of Object.entries(record.squared_errors)) {
        (history.errors[name] = history.errors[name] || []).push(error);
      }
      history.kl.push(record.kl);
      history.clip.push(record.clip_fraction);
    }
    for (const series of [history.expected, history.kl, history.clip, ...Object.values(history.errors)]) {
      if (series.length > HISTORY) series.splice(0, series.length - HISTORY);
    }
    if (records.length) page.record = records[records.length - 1];
    page.state = state;
    page.generation = state.generation;
    render();
  }

  const fmt = (v, digits = 3) => {
    if (v === null || v === undefined) return "\u2014";
    if (v !== 0 && (Math.abs(v) >= 1e4 || Math.abs(v) < 10 ** -digits)) return v.toExponential(2);
    return v.toFixed(digits);
  };
  const label = (name) => (page.options.baselines.find((b) => b.name === name) || { label: name }).label;
  const color = (name, i) => COLORS[name] || SPARE_COLORS[i % SPARE_COLORS.length];
  const names = () => page.options.baselines.map((b) => b.name);

  function render() {
    const state = page.state;
    const settings = page.settings;
    if (!state || !settings) return;
    el("step-count").textContent = String(state.step);
    el("expected").textContent = fmt(state.expected_reward, 4);
    el("best").textContent = fmt(state.best, 4);
    el("command").textContent = state.command;
    el("replay-note").textContent = state.replayable
      ? "Prints every step's numbers as JSON: the same numbers as this page."
      : "A setting changed during this run; the terminal replays runs whose settings stay fixed. Reset to start one.";
    el("batches").textContent = String(state.monte_carlo_batches);
    renderPolicy(state, settings);
    renderReward(state, settings);
    renderGradient(state);
    renderVariance(state, settings);
    renderNoise(settings);
    renderEstimators(state, settings);
    renderBias(state, settings);
    renderReuse(settings);
    renderRatios(settings);
  }

  function renderPolicy(state, settings) {
    const best = Math.max(...settings.means);
    bars(el("policy-chart"), {
      groups: settings.means.map((m, k) => `${k}: \u03bc=${m}`),
      series: [{ values: state.probs, colors: settings.means.map((m) => (m === best ? "#2a9d5c" : "#2060c0")) }],
      lo: 0,
      hi: 1,
    });
    el("probs").replaceChildren(
      ...state.probs.map((p, k) => {
        const item = document.createElement("li");
        item.textContent = `arm ${k}: ${p.toFixed(3)}`;
        item.dataset.prob = String(p);
        return item;
      }),
    );
  }

  function renderReward(state, settings) {
    const values = [...page.history.expected, state.expected_reward];
    const lo = Math.min(...settings.means, ...values.filter(Number.isFinite));
    const hi = Math.max(...settings.means, ...values.filter(Number.isFinite));
    lines(el("reward-chart"), {
      series: [{ values, color: "#2060c0", width: 2 }],
      lo: lo - 0.05 * (hi - lo || 1),
      hi: hi + 0.05 * (hi - lo || 1),
      rules: [{ y: state.best, dash: [5, 4], color: "#2a9d5c" }],
      xlabel: `last ${values.length - 1} steps`,
    });
  }

  function renderGradient(state) {
    const record = page.record;
    const series = [{ values: record ? record.exact_gradient : state.exact_gradient, colors: EXACT, outline: true }];
    const legend = [["exact \u2207J", EXACT]];
    if (record) {
      names().forEach((name, i) => {
        const chosen = name === page.settings.baseline;
        series.push({ values: record.estimates[name], colors: color(name, i), alpha: chosen ? 1 : 0.55 });
        legend.push([label(name) + (chosen ? " (used)" : ""), color(name, i)]);
      });
    }
    bars(el("gradient-chart"), { groups: state.probs.map((_, k) => `arm ${k}`), series, symmetric: true });
    el("gradient-legend").replaceChildren(
      ...legend.map(([text, c]) => {
        const item = document.createElement("span");
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = c;
        item.append(swatch, text);
        return item;
      }),
    );
  }

  function meterRow(text, value, max, c) {
    const row = document.createElement("div");
    row.className = "row";
    const name = document.createElement("span");
    name.textContent = text;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.background = c;
    fill.style.width = `${value === null || !(max > 0) ? 0 : Math.max(0.5, (100 * value) / max)}%`;
    track.append(fill);
    const number = document.createElement("span");
    number.className = "value";
    number.textContent = fmt(value, 4);
    row.append(name, track, number);
    return row;
  }

  function renderVariance(state, settings) {
    const without = state.moments.none.variance;
    const chosen = settings.baseline;
    const rows = [meterRow("without baseline", without, Math.max(without, state.moments[chosen].variance), COLORS.none)];
    const ratio = el("variance-ratio");
    if (chosen === "none") {
      ratio.textContent = "No baseline chosen: pick one to see what it removes.";
      ratio.dataset.ratio = "1";
    } else {
      const withIt = state.moments[chosen].variance;
      rows.push(meterRow(`with ${label(chosen)}`, withIt, Math.max(without, withIt), color(chosen, 0)));
      const r = without > 0 && withIt !== null ? withIt / without : null;
      ratio.dataset.ratio = r === null ? "" : String(r);
      ratio.textContent =
        r === null
          ? "Both variances are zero here."
          : r < 1
            ? `The baseline divides the variance by ${fmt(1 / r, 1)} (with / without = ${fmt(r)}).`
            : `Here the baseline multiplies the variance by ${fmt(r, 2)}: it helps when rewards share an offset.`;
    }
    el("variance-meter").replaceChildren(...rows);
  }

  function movingAverage(values) {
    const out = [];
    let sum = 0;
    values.forEach((v, i) => {
      sum += v;
      if (i >= SMOOTH) sum -= values[i - SMOOTH];
      out.push(sum / Math.min(i + 1, SMOOTH));
    });
    return out;
  }

  function renderNoise(settings) {
    const series = names().map((name, i) => ({
      values: movingAverage(page.history.errors[name] || []),
      color: color(name, i),
      width: name === settings.baseline ? 2.5 : 1.2,
    }));
    const all = series.flatMap((s) => s.values).filter((v) => v > 0 && Number.isFinite(v));
    lines(el("noise-chart"), {
      series,
      log: true,
      lo: all.length ? Math.min(...all) : 1e-3,
      hi: all.length ? Math.max(...all) : 1,
      xlabel: "steps (colours as in the gradient chart)",
    });
  }

  function renderEstimators(state, settings) {
    const reference = state.moments.none.variance;
    el("estimators")
      .querySelector("tbody")
      .replaceChildren(
        ...names().map((name, i) => {
          const row = document.createElement("tr");
          row.dataset.name = name;
          if (name === settings.baseline) row.className = "chosen";
          const m = state.moments[name];
          const cells = [
            label(name) + (name === settings.baseline ? " (used)" : ""),
            fmt(m.variance, 4),
            reference > 0 && m.variance !== null ? `\u00d7 ${fmt(m.variance / reference)}` : "\u2014",
            m.scale === null ? "\u2014" : `${fmt(m.scale)} \u00b1 ${fmt(m.scale_error, 2)}`,
          ];
          row.append(
            ...cells.map((text, j) => {
              const cell = document.createElement("td");
              cell.textContent = text;
              if (j === 0) cell.style.color = color(name, i);
              return cell;
            }),
          );
          return row;
        }),
      );
  }

  function renderBias(state, settings) {
    const n = settings.samples;
    const group = state.moments.group;
    const loo = state.moments.loo;
    bars(el("bias-chart"), {
      groups: state.probs.map((_, k) => `arm ${k}`),
      series: [
        { values: state.exact_gradient, colors: EXACT, outline: true },
        { values: state.group_mean_expected_gradient, colors: COLORS.group, outline: true },
        { values: group.mean, colors: COLORS.group },
        { values: loo.mean, colors: COLORS.loo },
      ],
      symmetric: true,
    });
    el("bias-note").textContent =
      `Black outline: \u2207J. Purple outline: (N\u22121)/N \u00b7 \u2207J = ${fmt((n - 1) / n)} \u00b7 \u2207J. ` +
      `Filled: E g of the group mean (purple, scale ${fmt(group.scale)} \u00b1 ${fmt(group.scale_error, 2)}) and of ` +
      `leave-one-out (blue, scale ${fmt(loo.scale)} \u00b1 ${fmt(loo.scale_error, 2)}). ` +
      "Reset to see it while the gradient is large.";
  }

  function renderReuse(settings) {
    const kl = page.history.kl;
    const hi = Math.max(1e-12, ...kl.filter(Number.isFinite));
    lines(el("reuse-chart"), {
      series: [
        { values: kl.map((v) => v / hi), color: "#2060c0", width: 1.8 },
        { values: page.history.clip, color: "#e08a1e", width: 1.2 },
      ],
      lo: 0,
      hi: 1,
      xlabel: `KL scaled to its largest, ${fmt(hi)}; clipped fraction on 0..1`,
    });
    const record = page.record;
    el("reuse-note").textContent =
      settings.epochs === 1
        ? "One update per batch: plain REINFORCE, nothing clipped. Raise \u201cupdates per batch\u201d to reuse the batch."
        : record
          ? `Last step: ${settings.epochs} updates on one batch, KL to the sampling policy ${fmt(record.kl, 5)}, ` +
            `clipped fraction of the last update ${fmt(record.clip_fraction, 2)}.`
          : `${settings.epochs} updates per batch: take a step.`;
  }

  function renderRatios(settings) {
    const record = page.record;
    const ratios = record ? record.ratios : settings.means.map(() => 1);
    const spread = Math.max(settings.clip_eps * 1.6, ...ratios.map((r) => Math.abs(r - 1) * 1.1).filter(Number.isFinite));
    bars(el("ratio-chart"), {
      groups: ratios.map((_, k) => `arm ${k}`),
      series: [{ values: ratios, colors: "#2060c0" }],
      base: 1,
      lo: Math.max(0, 1 - spread),
      hi: 1 + spread,
      band: [1 - settings.clip_eps, 1 + settings.clip_eps],
    });
  }

  // ---------------------------------------------------------------- drawing

  const PAD = { left: 52, right: 8, top: 8, bottom: 26 };

  function surface(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || canvas.width;
    const h = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px system-ui, sans-serif";
    return { ctx, w, h, x0: PAD.left, x1: w - PAD.right, y0: h - PAD.bottom, y1: PAD.top };
  }

  function yAxis(s, lo, hi, y, ticks) {
    const { ctx } = s;
    ctx.fillStyle = "#5b6475";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    const drawn = new Set();
    for (const [value, text] of ticks) {
      if (drawn.has(text)) continue;
      drawn.add(text);
      ctx.fillText(text, s.x0 - 6, y(value));
    }
    ctx.strokeStyle = "#d8dce4";
    ctx.beginPath();
    ctx.moveTo(s.x0, s.y1);
    ctx.lineTo(s.x0, s.y0);
    ctx.stroke();
  }

  function bars(canvas, { groups, series, lo, hi, base = 0, symmetric = false, band = null }) {
    const s = surface(canvas);
    const { ctx } = s;
    const values = series.flatMap((item) => item.values).filter(Number.isFinite);
    if (symmetric) {
      const m = Math.max(1e-12, ...values.map(Math.abs)) * 1.1;
      lo = -m;
      hi = m;
    }
    const y = (v) => s.y0 - ((v - lo) / (hi - lo || 1)) * (s.y0 - s.y1);
    if (band) {
      ctx.fillStyle = "rgba(32, 96, 192, 0.10)";
      ctx.fillRect(s.x0, y(band[1]), s.x1 - s.x0, y(band[0]) - y(band[1]));
    }
    const slot = (s.x1 - s.x0) / Math.max(1, groups.length);
    const width = (slot * 0.8) / Math.max(1, series.length);
    groups.forEach((text, k) => {
      series.forEach((item, j) => {
        const v = item.values[k];
        if (!Number.isFinite(v)) return;
        const x = s.x0 + k * slot + slot * 0.1 + j * width;
        const top = Math.min(y(v), y(base));
        const height = Math.max(1, Math.abs(y(v) - y(base)));
        const c = Array.isArray(item.colors) ? item.colors[k] : item.colors;
        ctx.globalAlpha = item.alpha ?? 1;
        if (item.outline) {
          ctx.strokeStyle = c;
          ctx.lineWidth = 1.5;
          ctx.strokeRect(x + 0.75, top, width - 1.5, height);
        } else {
          ctx.fillStyle = c;
          ctx.fillRect(x, top, width - 1, height);
        }
        ctx.globalAlpha = 1;
      });
      ctx.fillStyle = "#5b6475";
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      ctx.fillText(text, s.x0 + (k + 0.5) * slot, s.y0 + 6, slot);
    });
    ctx.strokeStyle = "#9aa3b3";
    ctx.beginPath();
    ctx.moveTo(s.x0, y(base));
    ctx.lineTo(s.x1, y(base));
    ctx.stroke();
    yAxis(s, lo, hi, y, [
      [lo, fmt(lo, 2)],
      [base, fmt(base, 2)],
      [hi, fmt(hi, 2)],
    ]);
  }

  function lines(canvas, { series, lo, hi, log = false, rules = [], xlabel = "" }) {
    const s = surface(canvas);
    const { ctx } = s;
    const t = (v) => (log ? Math.log10(Math.max(v, 1e-300)) : v);
    let a = t(lo);
    let b = t(hi);
    if (!(b > a)) {
      a -= 0.5;
      b += 0.5;
    }
    const y = (v) => s.y0 - ((t(v) - a) / (b - a)) * (s.y0 - s.y1);
    const count = Math.max(2, ...series.map((item) => item.values.length));
    const x = (i) => s.x0 + (i / (count - 1)) * (s.x1 - s.x0);
    for (const rule of rules) {
      ctx.strokeStyle = rule.color;
      ctx.setLineDash(rule.dash || []);
      ctx.beginPath();
      ctx.moveTo(s.x0, y(rule.y));
      ctx.lineTo(s.x1, y(rule.y));
      ctx.stroke();
      ctx.setLineDash([]);
    }
    for (const item of series) {
      ctx.strokeStyle = item.color;
      ctx.lineWidth = item.width || 1.5;
      ctx.beginPath();
      let drawing = false;
      item.values.forEach((v, i) => {
        if (!Number.isFinite(v) || (log && v <= 0)) {
          drawing = false;
          return;
        }
        if (drawing) ctx.lineTo(x(i), y(v));
        else ctx.moveTo(x(i), y(v));
        drawing = true;
      });
      ctx.stroke();
    }
    ctx.lineWidth = 1;
    const low = log ? 10 ** a : a;
    const high = log ? 10 ** b : b;
    yAxis(s, low, high, y, [
      [low, fmt(low, 2)],
      [high, fmt(high, 2)],
    ]);
    ctx.fillStyle = "#5b6475";
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    ctx.fillText(xlabel, (s.x0 + s.x1) / 2, s.y0 + 6);
  }

  // ---------------------------------------------------------------- start

  async function start() {
    try {
      page.options = await api("GET", "/api/options");
      const select = el("baseline");
      select.replaceChildren(
        ...page.options.baselines.map((b) => {
          const option = document.createElement("option");
          option.value = b.name;
          option.textContent = b.label;
          return option;
        }),
      );
      fillForm(page.options.defaults);
      const data = await api("POST", "/api/sessions", formSettings());
      page.session = data.id;
      page.settings = data.settings;
      take([], data.state);
      document.body.dataset.ready = "true";
    } catch (err) {
      showMessage(err.message, err.field);
    }
  }

  for (const name of FIELDS) {
    el(name).addEventListener("input", scheduleSettings);
    el(name).addEventListener("change", sendSettings);
  }
  el("add-arm").addEventListener("click", () => {
    document.querySelector("#arms tbody").append(armRow(0));
    numberArms();
    sendSettings();
  });
  el("step").addEventListener("click", step);
  el("run").addEventListener("click", run);
  el("pause").addEventListener("click", pause);
  el("reset").addEventListener("click", reset);
  window.addEventListener("resize", render);
  start();
})();
