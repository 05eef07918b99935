// A small runtime check of a response body against a schema of openapi/openapi.json, so the smoke
// test proves at run time what `tsc` proves at compile time: the data the server sends is what the
// generated types say. Strict on purpose: a property the schema does not declare is an error too
// (the generated type would not know it), as is a `null` where the schema is not nullable.
import { readFileSync } from "node:fs";

type Schema = {
  $ref?: string;
  type?: string;
  format?: string;
  enum?: unknown[];
  required?: string[];
  properties?: Record<string, Schema>;
  additionalProperties?: boolean | Schema;
  items?: Schema;
  allOf?: Schema[];
  nullable?: boolean;
};

// The spec the client was generated from: openapi/openapi.json unless OATS_SPEC names another.
const specPath = process.env["OATS_SPEC"] || new URL("../../../openapi/openapi.json", import.meta.url);
const spec = JSON.parse(readFileSync(specPath, "utf8")) as { components: { schemas: Record<string, Schema> } };

const DATE_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/;

function resolve(schema: Schema): Schema {
  if (schema.$ref === undefined) return schema;
  const name = schema.$ref.replace("#/components/schemas/", "");
  const target = spec.components.schemas[name];
  if (target === undefined) throw new Error(`spec-check: unknown $ref ${schema.$ref}`);
  return resolve(target);
}

function check(value: unknown, raw: Schema, at: string, problems: string[]): void {
  const schema = resolve(raw);
  for (const part of schema.allOf ?? []) check(value, part, at, problems);
  if (value === null) {
    if (schema.nullable !== true && schema.type !== undefined) problems.push(`${at}: null but not nullable`);
    return;
  }
  if (schema.enum !== undefined && !schema.enum.includes(value)) {
    problems.push(`${at}: ${JSON.stringify(value)} is not one of ${JSON.stringify(schema.enum)}`);
  }
  switch (schema.type) {
    case undefined:
      return;
    case "string":
      if (typeof value !== "string") problems.push(`${at}: expected a string, got ${JSON.stringify(value)}`);
      else if (schema.format === "date-time" && !DATE_TIME.test(value)) problems.push(`${at}: not a date-time: ${value}`);
      return;
    case "integer":
      if (!Number.isInteger(value)) problems.push(`${at}: expected an integer, got ${JSON.stringify(value)}`);
      else if (schema.format?.startsWith("uint") && (value as number) < 0) problems.push(`${at}: negative ${schema.format}`);
      return;
    case "number":
      if (typeof value !== "number") problems.push(`${at}: expected a number, got ${JSON.stringify(value)}`);
      return;
    case "boolean":
      if (typeof value !== "boolean") problems.push(`${at}: expected a boolean, got ${JSON.stringify(value)}`);
      return;
    case "array":
      if (!Array.isArray(value)) {
        problems.push(`${at}: expected an array`);
        return;
      }
      value.forEach((item, i) => check(item, schema.items ?? {}, `${at}[${i}]`, problems));
      return;
    case "object": {
      if (typeof value !== "object" || Array.isArray(value)) {
        problems.push(`${at}: expected an object`);
        return;
      }
      const record = value as Record<string, unknown>;
      for (const key of schema.required ?? []) {
        if (!(key in record)) problems.push(`${at}.${key}: required but missing`);
      }
      for (const [key, field] of Object.entries(record)) {
        const declared = schema.properties?.[key];
        if (declared !== undefined) check(field, declared, `${at}.${key}`, problems);
        else if (typeof schema.additionalProperties === "object") check(field, schema.additionalProperties, `${at}.${key}`, problems);
        else if (schema.additionalProperties !== true) problems.push(`${at}.${key}: not declared in the spec`);
      }
      return;
    }
    default:
      problems.push(`${at}: spec-check does not know type ${schema.type}`);
  }
}

/** Throws unless `value` fits `#/components/schemas/<name>` exactly. */
export function assertFits(name: string, value: unknown): void {
  const problems: string[] = [];
  check(value, { $ref: `#/components/schemas/${name}` }, name, problems);
  if (problems.length > 0) {
    throw new Error(`response does not fit the spec's ${name}:\n  ${problems.join("\n  ")}\n${JSON.stringify(value)}`);
  }
}
