// Live refresh of the dashboard, without reloading the page.
//
// Every two seconds it fetches the JSON state named by <main data-state> and patches
// the numbers in place: every element with a data-field, inside the row of its batch
// (data-batch) on the list, or anywhere on a batch's page. When the state's version
// differs from the page's (a new batch on the list; a batch's new status, failures or
// files), the page's HTML is fetched again and its <main> swapped in, so the server
// stays the only place that renders rows and sections. The chart is fetched again
// as an SVG. Nothing here builds HTML from data.
"use strict";

(function () {
  const POLL_MS = 2000;
  const main = document.querySelector("main[data-state]");
  const updated = document.getElementById("updated");
  if (!main || !main.dataset.state) return;

  let chartMinutes = null; // the minutes the chart on screen was drawn from
  const number = (n) => (n === null || n === undefined ? "?" : Number(n).toLocaleString("en-US"));

  function setText(root, field, text) {
    for (const el of root.querySelectorAll('[data-field="' + field + '"]')) {
      if (el.textContent !== text) el.textContent = text;
    }
  }

  function applyBatch(root, b) {
    for (const field of ["total", "done", "queued", "running", "succeeded", "failed", "cancelled"]) {
      setText(root, field, number(b[field]));
    }
    setText(root, "elapsed", b.elapsed);
    if (b.pace !== undefined) setText(root, "pace", b.pace);
    if (b.usage !== undefined) setText(root, "usage", b.usage);
    for (const el of root.querySelectorAll('[data-field="status"]')) {
      el.textContent = b.status;
      el.className = "status s-" + b.status;
    }
    const bar = root.querySelector(".bar");
    if (!bar) return;
    for (const part of ["succeeded", "failed", "cancelled", "running"]) {
      const el = bar.querySelector('[data-part="' + part + '"]');
      if (el) el.style.width = b.total ? ((100 * b[part]) / b.total).toFixed(2) + "%" : "0%";
    }
    bar.setAttribute("aria-label", number(b.done) + " of " + number(b.total) + " done");
  }

  function applyThrottle(t) {
    for (const field of ["backlog", "running", "in_flight", "workers"]) {
      setText(main.querySelector("#throttle") || main, field, number(t[field]));
    }
    setText(main, "pause", t.pause);
    const circuit = main.querySelector('[data-field="circuit"]');
    if (circuit) {
      circuit.textContent = t.circuit || "";
      circuit.hidden = !t.circuit;
    }
  }

  async function swapMain() {
    const reply = await fetch(location.pathname, { headers: { Accept: "text/html" } });
    if (!reply.ok) throw new Error("HTTP " + reply.status);
    const doc = new DOMParser().parseFromString(await reply.text(), "text/html");
    const fresh = doc.querySelector("main");
    if (!fresh) return;
    main.replaceChildren(...Array.from(fresh.childNodes).map((n) => document.importNode(n, true)));
    main.dataset.version = fresh.dataset.version || "";
  }

  async function refreshChart() {
    const box = main.querySelector("#chart");
    if (!box) return;
    const reply = await fetch("/throttle.svg");
    if (!reply.ok) throw new Error("HTTP " + reply.status);
    const svg = new DOMParser().parseFromString(await reply.text(), "image/svg+xml").documentElement;
    if (svg && svg.nodeName === "svg") box.replaceChildren(document.importNode(svg, true));
  }

  async function poll() {
    try {
      const reply = await fetch(main.dataset.state, { headers: { Accept: "application/json" } });
      if (!reply.ok) throw new Error("HTTP " + reply.status);
      const state = await reply.json();
      if (state.version !== main.dataset.version) {
        await swapMain();
      }
      if (state.batch) applyBatch(main, state.batch);
      for (const b of state.batches || []) {
        const row = main.querySelector('[data-batch="' + b.number + '"]');
        if (row) applyBatch(row, b);
      }
      if (state.throttle) {
        applyThrottle(state.throttle);
        // The SVG is drawn from the same minutes: fetched again only when they changed.
        const minutes = JSON.stringify(state.throttle.minutes);
        if (minutes !== chartMinutes) {
          await refreshChart();
          chartMinutes = minutes;
        }
      }
      if (updated) updated.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      if (updated) updated.textContent = "refresh failed (" + err.message + "); retrying";
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  setTimeout(poll, POLL_MS);
})();
