# Command lines for systemd's ExecStart=, shared by the lazystore modules.
#
# systemd splits ExecStart= on whitespace, honours double quotes, and
# expands `%` specifiers and `$VAR`/`${VAR}` everywhere. So a value from the
# configuration is quoted unless it is plain, with `%` and `$` doubled (a
# store URL may hold `%2F`, an argument a `$`); the credentials directory
# is the one place expanded on purpose.
{ lib }:
rec {
  # One word of the command line, exactly `value` once systemd has parsed it.
  arg =
    value:
    let
      s = toString value;
    in
    if builtins.match "[A-Za-z0-9_./:=@+,-]+" s != null then
      s
    else
      builtins.toJSON (lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] s);

  # The path of the credential `name` (LoadCredential=name:…), expanded by
  # systemd when it starts the command.
  credential = name: "\${CREDENTIALS_DIRECTORY}/${name}";

  # `program` and its words (already made by arg or credential).
  command = program: words: lib.concatStringsSep " " ([ (arg program) ] ++ words);
}
