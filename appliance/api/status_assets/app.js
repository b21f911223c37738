// The status page's script: polls /status.json, draws the board and its charts, and runs the
// admin actions behind a confirmation dialog. No framework, no inline code (the page's CSP).
// Every server value reaches the page through textContent, never as HTML.
(function () {
  "use strict";

  var KEY_SLOT = "appliance-status-key"; // sessionStorage: this tab only, never in a URL
  var SVG = "http://www.w3.org/2000/svg";
  var body = document.body;
  var mode = body.dataset.mode; // "key": an admin key is set; "open": loopback, read-only
  var refreshS = Number(body.dataset.refresh) || 5;
  var timer = null;
  var busy = false; // an admin action is running
  var last = null; // the last snapshot

  function $(id) {
    return document.getElementById(id);
  }
  function show(el, on) {
    el.hidden = !on;
  }
  function text(el, value) {
    el.textContent = value === null || value === undefined ? "–" : String(value);
    return el;
  }
  function make(tag, cls, value) {
    var el = document.createElement(tag);
    if (cls) el.className = cls;
    if (value !== undefined) text(el, value);
    return el;
  }

  // -- formatting
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return (i ? n.toFixed(n < 10 ? 2 : 1) : n.toFixed(0)) + " " + units[i];
  }
  function seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms";
    return s.toFixed(2) + " s";
  }
  function duration(s) {
    s = Math.floor(s);
    var d = Math.floor(s / 86400),
      h = Math.floor((s % 86400) / 3600),
      m = Math.floor((s % 3600) / 60);
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + (s % 60) + "s";
    return s + "s";
  }
  function rate(x) {
    if (x === null || x === undefined) return "–";
    return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
  }
  function clock(t) {
    return t ? new Date(t * 1000).toLocaleTimeString() : "–";
  }
  function percent(x) {
    return x === null || x === undefined ? "–" : Math.round(x * 100) + "%";
  }

  // -- the key
  function key() {
    try {
      return sessionStorage.getItem(KEY_SLOT);
    } catch (e) {
      return null;
    }
  }
  function setKey(value) {
    try {
      if (value) sessionStorage.setItem(KEY_SLOT, value);
      else sessionStorage.removeItem(KEY_SLOT);
    } catch (e) {
      /* storage off: the key lives until the page reloads */
    }
    memoryKey = value;
  }
  var memoryKey = null;
  function headers(extra) {
    var h = extra || {};
    var k = key() || memoryKey;
    if (mode === "key" && k) h.Authorization = "Bearer " + k;
    return h;
  }
  function askForKey(message) {
    clearTimeout(timer);
    last = null;
    show($("board"), false);
    show($("summary"), false);
    show($("key-panel"), true);
    var err = $("key-error");
    text(err, message || "");
    show(err, !!message);
    $("key-input").value = "";
    $("key-input").focus();
  }

  // -- polling
  function schedule(s) {
    clearTimeout(timer);
    timer = setTimeout(poll, Math.max(1, s) * 1000);
  }
  function problem(message) {
    var el = $("problem");
    text(el, message || "");
    show(el, !!message);
  }
  function errorMessage(data, status) {
    if (data && data.error && data.error.message) return data.error.message;
    return "HTTP " + status;
  }

  function poll() {
    if (mode === "key" && !(key() || memoryKey)) {
      askForKey("");
      return;
    }
    if (document.hidden) {
      schedule(refreshS); // no polls from a hidden tab; it refreshes when shown again
      return;
    }
    fetch("/status.json", { headers: headers(), cache: "no-store", credentials: "omit" })
      .then(function (r) {
        return r
          .json()
          .catch(function () {
            return null;
          })
          .then(function (data) {
            return { r: r, data: data };
          });
      })
      .then(function (res) {
        var r = res.r;
        if (r.status === 401 && mode === "key") {
          setKey(null);
          askForKey("That key was refused: " + errorMessage(res.data, r.status));
          return;
        }
        if (r.status === 429) {
          var wait = Number(r.headers.get("Retry-After")) || refreshS * 2;
          problem("Rate limited (the admin limit counts this page too); next try in " + wait + " s.");
          schedule(wait);
          return;
        }
        if (!r.ok) {
          problem(errorMessage(res.data, r.status));
          schedule(refreshS);
          return;
        }
        problem("");
        render(res.data);
        refreshS = res.data.access.refresh_s || refreshS;
        schedule(refreshS);
      })
      .catch(function (e) {
        problem("The appliance does not answer (" + e.message + "); retrying.");
        schedule(refreshS);
      });
  }

  // -- drawing
  function render(s) {
    last = s;
    show($("key-panel"), false);
    show($("board"), true);
    show($("summary"), true);
    show($("forget-key"), mode === "key");
    var admin = !!s.access.admin_actions;
    body.classList.toggle("admin", admin);
    document.querySelectorAll(".admin-only").forEach(function (el) {
      show(el, admin);
    });

    var h = s.health.status;
    text($("health"), h).className = "pill " + h;
    text($("ready"), s.readiness.ready ? "ready" : "not ready").className =
      "pill " + (s.readiness.ready ? "ok" : "bad");
    text($("version"), s.version);
    text($("backend"), s.backend);
    text($("uptime"), duration(s.uptime_s));
    text($("updated"), "updated " + clock(s.generated_at));

    text($("health-status"), h);
    text($("ready-text"), s.readiness.ready ? "yes" : "no: " + s.readiness.reason);
    var q = s.requests;
    text(
      $("requests-text"),
      q.running + " running of " + q.max_running + ", " + q.waiting + " queued of " + q.max_queued
    );
    text($("served-text"), q.served);
    var reasons = $("reasons");
    reasons.replaceChildren();
    s.health.reasons.forEach(function (x) {
      reasons.appendChild(make("li", x.status, x.reason));
    });

    show($("safe-mode"), s.safe_mode.on);
    text($("safe-mode-reason"), s.safe_mode.reason || "");

    renderModels(s);
    renderMemory(s.memory);
    renderCache(s.prompt_cache);
    renderErrors(s.errors);
    renderCharts(s.history, s.generated_at);
  }

  function cell(row, label, value, cls) {
    var td = make("td", cls, value);
    td.dataset.label = label;
    row.appendChild(td);
    return td;
  }

  function renderModels(s) {
    var tbody = $("models").tBodies[0];
    tbody.replaceChildren();
    var admin = !!s.access.admin_actions;
    s.models.forEach(function (m) {
      var tr = document.createElement("tr");
      tr.dataset.model = m.name;
      tr.dataset.state = m.state;
      var name = cell(tr, "Model", m.name, "name");
      if (m.default) name.appendChild(make("span", "tag", "default"));
      var st = cell(tr, "State", m.state, "state-" + m.state);
      st.dataset.field = "state";
      if (m.error) st.title = m.error;
      cell(tr, "Source", m.path, "path");
      var settings = Object.keys(m.settings)
        .map(function (k) {
          return k + "=" + m.settings[k];
        })
        .join(" ");
      cell(tr, "Settings", settings, "settings");
      cell(tr, "Memory est.", bytes(m.memory_estimate_bytes), "num");
      cell(tr, "Running", m.running, "num").dataset.field = "running";
      cell(tr, "Queued", m.waiting, "num").dataset.field = "waiting";
      cell(tr, "Tokens/s", rate(m.tokens_per_s), "num").dataset.field = "tokens_per_s";
      cell(tr, "TTFT p50", seconds(m.ttft_p50_s), "num").dataset.field = "ttft_p50_s";
      cell(tr, "Served", m.requests_served, "num").dataset.field = "requests_served";
      cell(tr, "Tokens", m.tokens_generated, "num").dataset.field = "tokens_generated";
      var act = cell(tr, "Actions", "", "admin-only");
      act.textContent = "";
      if (admin && m.state === "loaded") {
        var b = make("button", "small danger", "Unload");
        b.type = "button";
        b.dataset.action = "unload";
        b.dataset.model = m.name;
        b.disabled = busy;
        act.appendChild(b);
      } else if (admin && (m.state === "unloaded" || m.state === "failed")) {
        var l = make("button", "small", "Load");
        l.type = "button";
        l.dataset.action = "load";
        l.dataset.model = m.name;
        l.disabled = busy;
        act.appendChild(l);
      }
      show(act, admin);
      tbody.appendChild(tr);
    });
    fillList($("catalog"), s.models.map(function (m) {
      return m.name;
    }));
    fillList($("presets"), s.presets || []);
  }

  function fillList(list, names) {
    var have = Array.prototype.map
      .call(list.options, function (o) {
        return o.value;
      })
      .join("\n");
    if (have === names.join("\n")) return;
    list.replaceChildren();
    names.forEach(function (n) {
      var o = document.createElement("option");
      o.value = n;
      list.appendChild(o);
    });
  }

  function facts(dl, pairs) {
    dl.replaceChildren();
    pairs.forEach(function (p) {
      dl.appendChild(make("dt", "", p[0]));
      var dd = make("dd", "", p[1]);
      if (p[2]) dd.id = p[2];
      dl.appendChild(dd);
    });
  }

  function renderMemory(m) {
    var total = m.system_total || 1;
    var active = m.mlx_active || 0,
      cache = m.mlx_cache || 0;
    // MLX memory on the CPU and Metal is system memory: the rest of the used part is "other".
    var other = Math.max(0, m.system_used - active - cache);
    function width(id, part) {
      $(id).style.width = Math.min(100, (100 * part) / total).toFixed(2) + "%";
    }
    width("bar-active", active);
    width("bar-cache", cache);
    width("bar-other", other);
    var limit = $("bar-limit");
    if (m.limit && m.limit < total) {
      limit.style.left = ((100 * m.limit) / total).toFixed(2) + "%";
      show(limit, true);
    } else {
      show(limit, false);
    }
    facts($("memory"), [
      ["System", bytes(m.system_used) + " of " + bytes(m.system_total) + " (" +
        m.system_percent.toFixed(0) + "%)", "mem-system"],
      ["MLX active", bytes(m.mlx_active), "mem-active"],
      ["MLX cache", bytes(m.mlx_cache), "mem-cache"],
      ["MLX peak", bytes(m.mlx_peak)],
      ["Process RSS", bytes(m.rss)],
      ["Limit", m.limit ? bytes(m.limit) : "MLX default", "mem-limit"],
    ]);
  }

  function renderCache(c) {
    facts($("prompt-cache"), [
      ["Entries", c.entries === null ? "–" : c.entries, "cache-entries"],
      ["Bytes", bytes(c.bytes), "cache-bytes"],
      ["Budget", bytes(c.budget_bytes_per_model) + " per model"],
      ["Hit ratio", percent(c.hit_ratio) + " (" + c.hits + " of " + (c.hits + c.misses) + ")",
        "cache-hit-ratio"],
    ]);
  }

  function renderErrors(errors) {
    var tbody = $("errors").tBodies[0];
    tbody.replaceChildren();
    errors.forEach(function (e) {
      var tr = document.createElement("tr");
      tr.dataset.status = e.status;
      tr.dataset.path = e.path;
      tr.appendChild(make("td", "num", e.status));
      tr.appendChild(make("td", "path", e.path));
      tr.appendChild(make("td", "", e.code || ""));
      tr.appendChild(make("td", "num", e.count));
      tr.appendChild(make("td", "", clock(e.last_at)));
      tbody.appendChild(tr);
    });
    show($("errors"), errors.length > 0);
    show($("no-errors"), errors.length === 0);
  }

  // -- charts: inline SVG drawn in the element's own pixels; x spans the last window_s seconds
  function svgEl(tag, attrs) {
    var el = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) {
      el.setAttribute(k, String(attrs[k]));
    });
    return el;
  }

  function chart(id, samples, series, now, windowS, fmt) {
    var svg = $(id);
    var w = Math.max(100, Math.round(svg.clientWidth || 300));
    var h = Math.max(40, Math.round(svg.clientHeight || 100));
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.replaceChildren();
    for (var g = 1; g < 4; g++) {
      svg.appendChild(svgEl("line", { class: "grid", x1: 0, x2: w, y1: (g * h) / 4, y2: (g * h) / 4 }));
    }
    var max = 0;
    series.forEach(function (s) {
      samples.forEach(function (p) {
        var v = p[s.key];
        if (v !== null && v !== undefined && v > max) max = v;
      });
    });
    var top = max > 0 ? max * 1.15 : 1;
    var pad = 3; // keep a line at 0 or at the top inside the box
    text($(id + "-max"), "max " + fmt(max));
    series.forEach(function (s, i) {
      var runs = [[]]; // a null value (no request finished in that interval) breaks the line
      samples.forEach(function (p) {
        var v = p[s.key];
        if (v === null || v === undefined) {
          if (runs[runs.length - 1].length) runs.push([]);
          return;
        }
        var x = w - ((now - p.t) / windowS) * w;
        var y = h - pad - (v / top) * (h - 2 * pad);
        runs[runs.length - 1].push([x, y]);
      });
      var cls = i ? " second" : "";
      var lastPoint = null;
      runs.forEach(function (run) {
        if (!run.length) return;
        var d = run
          .map(function (pt, j) {
            return (j ? "L" : "M") + pt[0].toFixed(1) + " " + pt[1].toFixed(1);
          })
          .join(" ");
        if (!i && run.length > 1) {
          var first = run[0][0].toFixed(1),
            end = run[run.length - 1][0].toFixed(1);
          svg.appendChild(svgEl("path", { class: "area", d: d + " L" + end + " " + h + " L" + first + " " + h + " Z" }));
        }
        if (run.length > 1) svg.appendChild(svgEl("path", { class: "line" + cls, d: d }));
        else svg.appendChild(svgEl("circle", { class: "dot" + cls, cx: run[0][0], cy: run[0][1], r: 2.5 }));
        lastPoint = run[run.length - 1];
      });
      if (lastPoint) {
        svg.appendChild(svgEl("circle", { class: "dot" + cls, cx: lastPoint[0], cy: lastPoint[1], r: 2.5 }));
      }
    });
    svg.dataset.points = String(samples.length);
  }

  function renderCharts(h, now) {
    var s = h.samples;
    chart("chart-tokens", s, [{ key: "tokens_per_s" }], now, h.window_s, rate);
    chart(
      "chart-requests",
      s,
      [{ key: "requests_per_s" }, { key: "running" }],
      now,
      h.window_s,
      rate
    );
    chart("chart-ttft", s, [{ key: "ttft_p50_s" }], now, h.window_s, seconds);
  }

  // -- admin actions: a <dialog> to confirm, then the admin API; its error message when refused
  var pending = null;
  function confirmThen(title, message, okLabel, action) {
    var dlg = $("confirm");
    text($("confirm-title"), title);
    text($("confirm-text"), message);
    text($("confirm-ok"), okLabel);
    pending = action;
    dlg.showModal();
    $("confirm-cancel").focus();
  }
  function closeDialog(ok) {
    var dlg = $("confirm");
    var action = pending;
    pending = null;
    if (dlg.open) dlg.close(ok ? "ok" : "cancel");
    if (ok && action) action();
  }

  function result(message, good) {
    var el = $("action-result");
    text(el, message);
    el.className = "result " + (good ? "good" : "bad");
    show(el, true);
  }

  function setBusy(on) {
    busy = on;
    document.querySelectorAll("button[data-action], #load-submit, #safe-mode-exit").forEach(
      function (b) {
        b.disabled = on;
      }
    );
  }

  function post(path, payload, done) {
    setBusy(true);
    result("Working…", true);
    var init = {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      cache: "no-store",
      credentials: "omit",
    };
    if (payload) init.body = JSON.stringify(payload);
    fetch(path, init)
      .then(function (r) {
        return r
          .json()
          .catch(function () {
            return null;
          })
          .then(function (data) {
            if (!r.ok) throw new Error(errorMessage(data, r.status));
            return data;
          });
      })
      .then(function (data) {
        result(done(data), true);
      })
      .catch(function (e) {
        result("Refused: " + e.message, false);
      })
      .then(function () {
        setBusy(false);
        poll();
      });
  }

  function unload(name) {
    confirmThen(
      "Unload " + name + "?",
      "Requests in flight on " + name + " get up to 30 s to finish; the rest fail. " +
        "Requests for it after that load it again on first use.",
      "Unload",
      function () {
        post("/admin/models/unload", { model: name }, function (d) {
          return "Unloaded " + name + " in " + d.seconds + " s.";
        });
      }
    );
  }

  function load(fields) {
    var what = fields.model || fields.path;
    var details = Object.keys(fields)
      .map(function (k) {
        return k + ": " + fields[k];
      })
      .join(", ");
    confirmThen("Load " + (what || "a model") + "?", "Load with " + details + ".", "Load",
      function () {
        post("/admin/models/load", fields, function (d) {
          var name = d.model && d.model.name ? d.model.name : what;
          return d.already_loaded ? name + " was already loaded." :
            "Loaded " + name + " in " + d.seconds + " s.";
        });
      });
  }

  function wire() {
    $("key-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var value = $("key-input").value.trim();
      if (!value) return;
      setKey(value);
      $("key-input").value = "";
      show($("key-error"), false);
      poll();
    });
    $("forget-key").addEventListener("click", function () {
      setKey(null);
      askForKey("");
    });
    $("confirm-ok").addEventListener("click", function () {
      closeDialog(true);
    });
    $("confirm-cancel").addEventListener("click", function () {
      closeDialog(false);
    });
    $("confirm").addEventListener("cancel", function () {
      pending = null; // Escape
    });
    $("models").addEventListener("click", function (ev) {
      var b = ev.target.closest("button[data-action]");
      if (!b || busy) return;
      if (b.dataset.action === "unload") unload(b.dataset.model);
      else load({ model: b.dataset.model });
    });
    $("load-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      // Only the fields filled in are sent: the API names any it does not take.
      var fields = {};
      [["model", "load-model"], ["path", "load-path"], ["preset", "load-preset"]].forEach(
        function (f) {
          var v = $(f[1]).value.trim();
          if (v) fields[f[0]] = v;
        }
      );
      if (!Object.keys(fields).length) {
        result("Give a catalog name, a path or a preset.", false);
        return;
      }
      load(fields);
    });
    $("safe-mode-exit").addEventListener("click", function () {
      confirmThen(
        "Leave safe mode?",
        "Safe mode ends: the normal limits come into force and the auto-load models load, without a restart.",
        "Leave safe mode",
        function () {
          post("/admin/safe-mode/exit", null, function (d) {
            return d.was_on ? "Safe mode is off." : "Safe mode was not on; nothing changed.";
          });
        }
      );
    });
    var resizing = null;
    window.addEventListener("resize", function () {
      clearTimeout(resizing);
      resizing = setTimeout(function () {
        if (last) renderCharts(last.history, last.generated_at);
      }, 150);
    });
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && (mode !== "key" || key() || memoryKey)) poll();
    });
  }

  wire();
  poll();
})();
