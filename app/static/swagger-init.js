// Starts Swagger UI on /api/v1/docs (app/routes/docs.py) with FastAPI's default options. It lives in
// a file, not inline in the page, so the page's Content-Security-Policy needs no 'unsafe-inline' script.
"use strict";
(() => {
  const url = document.currentScript.dataset.openapiUrl;
  window.ui = SwaggerUIBundle({
    url,
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null, // no badge fetched from validator.swagger.io
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  });
})();
